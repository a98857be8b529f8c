"""Several processes, one run: results do not depend on the layout (1 process x 1 device, 1 x 4,
2 processes x 2 devices), and bad launches fail within seconds.

Each layout runs in its own subprocess(es) (the device count is fixed when JAX starts, and the
distributed runtime can start once per process): ``python tests/test_distributed.py worker ...``.
The two processes of the 2 x 2 layout talk over 127.0.0.1 only, on a free port.

Two tiers. ``test_two_processes_match_one_device`` (default run) starts three processes at once
(1 x 1, and 2 x 2 over loopback) that each run ONE ``solve_batch`` call and compares the per-example
results. The ``slow`` tests add 1 x 4, the chunked and fixed-batch drivers, sharded generation and a
killed-then-resumed ``run_recovery``: every one of those is another set of programs to compile.
Measured (2 shared cores, one 2 x 2 process): startup (imports, distributed runtime) 2-5 s; the
three compiles of one ``solve_batch`` (init, advance, finish) 8 s alone in 1 x 1, 15 s per process
in 2 x 2 (two processes compiling partitioned programs on the same 2 cores), running the steps under
0.2 s. The slow worker compiles that set three times (progress chunks, all steps, per-device batch 2)
plus generation (6.5 s) and the resumable driver (3-5 s): 42 s per 2 x 2 process, four processes.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
N_EX, SEQ, D = 6, 5, 16  # 6 examples: padded to 8 on 4 devices, not padded on 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(n_dev: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXRECOVER_")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={n_dev}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


def _launch(args: list[str], n_dev: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args], cwd=ROOT, env=_env(n_dev),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
            text += "\n<killed: timeout>"
        out.append((p.returncode, text))
    return out


# ----------------------------------------------------------------------------- worker (subprocess)


def _problem():
    """A tiny llama, one clamp, 6 examples; the same arrays in every process (numpy seeds)."""
    import jax.numpy as jnp

    from jaxrecover.recover import objectives as O
    from jaxrecover.recover import solver as R
    from jaxrecover.sae.clamp import Clamp
    from jaxrecover.sae.autoencoder import SAE
    from jaxrecover.core.sites import Site
    from jaxrecover.testing import random_transformer, tiny_config

    import jax

    site = Site(1, "resid_pre")
    cfg = tiny_config("llama", d_model=D, n_heads=2, n_kv_heads=1, d_head=8, d_mlp=32)
    model = random_transformer(jax.random.key(0), cfg)
    rng = np.random.default_rng(1)
    sae = SAE(W_enc=jnp.asarray(rng.standard_normal((D, 24), np.float32) / D**0.5), b_enc=0.3 * jnp.ones(24),
              W_dec=jnp.asarray(rng.standard_normal((24, D), np.float32)), b_dec=jnp.zeros(D))
    clamp = Clamp(sae, jnp.array([0, 3], jnp.int32), jnp.zeros(2))
    toks = rng.integers(0, cfg.d_vocab, (N_EX, 1, SEQ)).astype(np.int32)
    ids = rng.integers(0, cfg.d_vocab, (N_EX, 1, SEQ)).astype(np.int32)
    ex = R.Example(tokens=toks, valid=np.ones((N_EX, 1, SEQ), bool),
                   delta_slots=np.tile(np.array([[SEQ - 2, SEQ - 1]], np.int32), (N_EX, 1)),
                   measure_mask=np.ones((N_EX, SEQ), bool),
                   target=O.Continuation(ids=ids, weights=np.ones((N_EX, 1, SEQ), np.float32)))
    rc = R.RecoveryConfig(steps=6, lr=0.1, budget=4.0)
    solver = R.make_solver(R.RecoveryProblem(site, (site,)), rc, O.continuation_logprob, O.continuation_success)
    return solver, model, ex, {site: clamp}


def _join(layout: str, port: int, pid: int) -> None:
    """Start the distributed runtime for a several-process layout; check the global device count."""
    from jaxrecover.runtime import distributed as distributed

    n_proc = int(layout.split("x")[0])
    if n_proc > 1:
        distributed.initialize(f"127.0.0.1:{port}", n_proc, pid, timeout_s=30)
    import jax

    assert len(jax.devices()) == {"1x1": 1, "1x4": 4, "2x2": 4}[layout], jax.devices()


def lean_worker(out: str, layout: str, port: int, pid: int) -> None:
    """One ``solve_batch`` call (all steps in one scan: three compiles), saved to
    ``{out}/lean_{layout}_{pid}.npz``."""
    _join(layout, port, pid)
    from jaxrecover.recover import batch as runner

    solver, model, ex, clamps = _problem()
    res = runner.solve_batch(solver, model, ex, clamps)
    np.savez(Path(out) / f"lean_{layout}_{pid}.npz", objective=np.asarray(res.objective),
             delta=np.asarray(res.delta), success=np.asarray(res.success), clamped=np.asarray(res.clamped_objective),
             trace=np.asarray(res.trace["objective"]), drift=np.asarray(res.metrics["drift_rel"]))
    print(f"lean worker {layout}/{pid}: ok", flush=True)


def worker(out: str, layout: str, port: int, pid: int) -> None:
    """Run one layout's share and save what this process holds to ``{out}/{layout}_{pid}.npz``."""
    _join(layout, port, pid)
    from jaxrecover.recover import batch as runner
    from jaxrecover.model.generate import generate
    from jaxrecover.sae.clamp import AddDelta, Clamp, compose

    solver, model, ex, clamps = _problem()
    t0 = time.time()
    res = runner.solve_batch(solver, model, ex, clamps, progress=True, steps_per_chunk=2)  # in chunks: the driver's programs
    t_solve = time.time() - t0
    fixed = runner.solve_batch(solver, model, ex, clamps, progress=True, per_device_batch=2, steps_per_chunk=2)  # 1x1: 3 calls of 2
    # generation under clamp + the recovered deltas (one row each), greedy, sharded over the rows
    (site, clamp), = clamps.items()
    hooks = {site: compose(clamp, AddDelta(res.delta, ex.delta_slots))}
    axes = {site: compose(Clamp(None, None, None), AddDelta(0, 0))}
    gen = generate(model, ex.tokens[:, 0], ex.valid[:, 0], max_new_tokens=3, hooks=hooks, hooks_in_axes=axes,
                   return_logits=True)
    # resumable driver (one batch of solve_batch's shape: no new compile), killed after one chunk,
    # resumed from the checkpoint all processes wrote, finished; a third call finds it all done
    run_dir = Path(out) / f"run_{layout}"
    kw = dict(run_id="r", batch_size=N_EX, progress=False, steps_per_chunk=2)
    assert runner.run_recovery(solver, model, ex, clamps, run_dir, stop_after_chunks=1, **kw) is None
    summary = runner.run_recovery(solver, model, ex, clamps, run_dir, **kw)
    assert runner.run_recovery(solver, model, ex, clamps, run_dir, **kw) == summary
    np.savez(Path(out) / f"{layout}_{pid}.npz", objective=np.asarray(res.objective), delta=np.asarray(res.delta),
             success=np.asarray(res.success), clamped=np.asarray(res.clamped_objective),
             trace=np.asarray(res.trace["objective"]), drift=np.asarray(res.metrics["drift_rel"]),
             gen_tokens=np.asarray(gen.tokens), gen_logits=np.asarray(gen.logits),
             n_recovered=np.asarray(summary["all"]["n"]), t_solve=np.asarray(t_solve),
             fixed_objective=np.asarray(fixed.objective), fixed_delta=np.asarray(fixed.delta),
             fixed_trace=np.asarray(fixed.trace["objective"]))
    print(f"worker {layout}/{pid}: ok", flush=True)


def handshake_worker(port: int, pid: int, version: str) -> None:
    """Join a 2-process run claiming ``version``: the handshake must refuse a mixed pair."""
    from jaxrecover import _version
    from jaxrecover.runtime import distributed as distributed

    _version.__version__ = version
    distributed.initialize(f"127.0.0.1:{port}", 2, pid, timeout_s=20)


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    out = tmp_path_factory.mktemp("layouts")
    port = _free_port()
    t0 = time.time()
    procs = [_launch(["worker", str(out), "1x1", "0", "0"], 1), _launch(["worker", str(out), "1x4", "0", "0"], 4),
             _launch(["worker", str(out), "2x2", str(port), "0"], 2), _launch(["worker", str(out), "2x2", str(port), "1"], 2)]
    results = _finish(procs, timeout=300)
    for rc, text in results:
        assert rc == 0, text[-4000:]
    print(f"layouts: {time.time() - t0:.1f} s")
    return out


def _load(out: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(out / f"{name}.npz") as f:
        return dict(f)


def _assert_same_results(got: dict, ref: dict, keys: tuple[str, ...], name: str) -> None:
    """Decisions equal; ``keys`` within 1e-6 relative in fp32 (relative to the array's scale: a
    delta entry near 0 has no meaningful relative error)."""
    np.testing.assert_array_equal(got["success"], ref["success"], err_msg=name)
    diffs = {k: float(np.max(np.abs(got[k] - ref[k]))) for k in keys}
    print(f"{name} vs 1x1, max |difference|: {diffs}")  # pytest -s shows how far from bitwise equal
    for key in keys:
        scale = max(1.0, float(np.abs(ref[key]).max()))
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-6, atol=1e-6 * scale, err_msg=f"{name}: {key}")


# Default run: 3 processes at once, one solve_batch each (decisions equal, objectives and deltas
# within 1e-6 relative). Measured with `time .venv/bin/python -m pytest -q tests/test_distributed.py
# -k two_processes_match` on AMD EPYC (/proc/cpuinfo), 2 cores shared with two other heavy jobs (load
# average 5-7): 43-50 s wall (pytest's own count 37-44 s), 30-45 s CPU in all; almost all of it is
# compiling (module docstring). Largest differences seen vs 1 x 1: objective 9.5e-7, delta 5.6e-7.
def test_two_processes_match_one_device(tmp_path):
    port = _free_port()
    procs = [_launch(["lean", str(tmp_path), "1x1", "0", "0"], 1),
             _launch(["lean", str(tmp_path), "2x2", str(port), "0"], 2),
             _launch(["lean", str(tmp_path), "2x2", str(port), "1"], 2)]
    for rc, text in _finish(procs, timeout=240):
        assert rc == 0, text[-4000:]
    ref = _load(tmp_path, "lean_1x1_0")
    # the comparison means something: the steps moved delta and the objective off the clamped value
    assert np.abs(ref["delta"]).max() > 1e-2 and np.abs(ref["objective"] - ref["clamped"]).max() > 1e-3
    assert ref["delta"].shape[0] == N_EX  # 6 examples: padded to 8 over the 4 devices of 2 x 2, unpadded back
    for name in ("lean_2x2_0", "lean_2x2_1"):
        _assert_same_results(_load(tmp_path, name), ref, ("objective", "clamped", "delta", "trace", "drift"), name)


# 4 subprocesses, each compiling the solver (three times) and generation: 137-168 s wall on the
# shared 2-core machine (load average ~12; ~95 s CPU in all), so outside the default
# run: pytest -m slow tests/test_distributed.py
@pytest.mark.slow
def test_results_do_not_depend_on_the_layout(layouts):
    ref = _load(layouts, "1x1_0")
    for name in ("1x4_0", "2x2_0", "2x2_1"):
        got = _load(layouts, name)
        np.testing.assert_array_equal(got["gen_tokens"], ref["gen_tokens"], err_msg=name)
        _assert_same_results(got, ref, ("objective", "clamped", "delta", "trace", "drift", "gen_logits"), name)


@pytest.mark.slow
def test_same_per_device_program_is_bitwise_equal_across_processes(layouts):
    # 1 x 4 and 2 x 2 run the same partitioned program with the same shapes on every device: the
    # process boundary changes nothing, to the bit (1 x 1 vs 4 devices may differ by an ulp: another
    # program; on SmolLM2 the per-device batch size dominates, which per_device_batch fixes)
    one, two = _load(layouts, "1x4_0"), _load(layouts, "2x2_0")
    for key in ("objective", "delta", "trace", "gen_logits", "fixed_objective", "fixed_delta", "fixed_trace"):
        np.testing.assert_array_equal(two[key], one[key], err_msg=key)
    ref = _load(layouts, "1x1_0")
    for key in ("fixed_objective", "fixed_delta", "fixed_trace"):
        scale = max(1.0, float(np.abs(ref[key]).max()))
        np.testing.assert_allclose(one[key], ref[key], rtol=1e-6, atol=1e-6 * scale, err_msg=key)


@pytest.mark.slow
def test_killed_multiprocess_run_resumes_to_the_same_records(layouts):
    files = {lay: (layouts / f"run_{lay}" / "r.jsonl").read_text() for lay in ("1x1", "1x4", "2x2")}
    recs = {lay: [json.loads(line) for line in text.splitlines()] for lay, text in files.items()}
    assert [r["index"] for r in recs["2x2"]] == list(range(N_EX))
    for lay in ("1x4", "2x2"):
        for a, b in zip(recs[lay], recs["1x1"], strict=True):
            assert a["status"] == b["status"] and a["recovered"] == b["recovered"]
            assert a["final_objective"] == pytest.approx(b["final_objective"], rel=1e-6, abs=1e-6)
    # process 1 wrote nothing of its own: one records file per batch, no stray temporaries
    names = sorted(p.name for p in (layouts / "run_2x2" / "records" / "r").iterdir())
    assert names == ["batch00000.jsonl", "batch00000_delta.npy"], names
    assert not list((layouts / "run_2x2").rglob("*.tmp"))


def test_options_are_checked_before_anything_starts(monkeypatch):
    from jaxrecover.runtime import distributed as distributed

    for k in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="give all three"):
        distributed.initialize(num_processes=2, auto=False)
    with pytest.raises(ValueError, match="outside"):
        distributed.initialize("127.0.0.1:1", 2, 2, auto=False)
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="not an integer"):
        distributed.initialize("127.0.0.1:1", None, 0, auto=False)
    monkeypatch.delenv(distributed.ENV_NUM_PROCESSES)
    assert distributed.initialize(auto=False) is False and distributed.is_writer()


@pytest.mark.parametrize("case", ["too_few_processes", "unreachable_coordinator"])
def test_bad_launch_fails_within_seconds(case, tmp_path):
    port = _free_port()  # nobody listens there in the second case
    pid = "0" if case == "too_few_processes" else "1"  # process 0 serves the coordinator itself
    cmd = [sys.executable, "-m", "jaxrecover.cli.app", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
           "--process-id", pid, "--init-timeout", "3", "run", "refusal", "--out", str(tmp_path)]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=120)
    took = time.time() - t0
    assert p.returncode == 2, p.stderr[-2000:]
    expect = "missing process ids: [1]" if case == "too_few_processes" else "could not reach the coordinator"
    assert expect in p.stderr and "within 3 s" in p.stderr, p.stderr[-2000:]
    assert took < 30, took


def test_mixed_versions_are_refused():
    port = _free_port()
    procs = [_launch(["handshake", str(port), "0", "0.2.0"], 1), _launch(["handshake", str(port), "1", "9.9.9"], 1)]
    for rc, text in _finish(procs, timeout=120):
        assert rc != 0 and "runs jaxrecover 9.9.9" in text, text[-3000:]


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif sys.argv[1] == "lean":
        lean_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif sys.argv[1] == "handshake":
        handshake_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
