"""Guard rails, round 2 (issue 22): bf16 SAE input order, Gemma Scope hooks from a symlinked snapshot,
output-folder safety (symlinks, two runs, kills, stale temps), resume after a changed flag, and
environment variables with garbage values."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxrecover.cli import app as cli
from jaxrecover.runtime import report as report
from jaxrecover.experiment import common as C
from jaxrecover.sae.autoencoder import SAE, encode, encode_features, encode_pre
from jaxrecover.sae.files import load_sae

BF16 = ml_dtypes.bfloat16


def _no_model(*a, **k):
    raise AssertionError("the model must not be loaded for a wrong input")


# ---- 3. a bf16 SAE given float32 input: cast first, then subtract b_dec (SAELens process_sae_in)


def _bf16_sae(d_in=64, d_sae=96, seed=0, activation="relu"):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((d_in, d_sae)).astype(np.float32) / 8
    kw = dict(threshold=jnp.asarray(np.full(d_sae, 0.05), jnp.bfloat16)) if activation == "jumprelu" else {}
    return SAE(W_enc=jnp.asarray(W, jnp.bfloat16), b_enc=jnp.asarray(rng.standard_normal(d_sae) * 0.1, jnp.bfloat16),
               W_dec=jnp.asarray(W.T, jnp.bfloat16), b_dec=jnp.asarray(rng.standard_normal(d_in), jnp.bfloat16),
               apply_b_dec_to_input=True, activation=activation, **kw)


def test_bf16_sae_rounds_its_float32_input_before_subtracting_b_dec():
    sae = _bf16_sae()
    x = (np.random.default_rng(1).standard_normal((6, 64)) * 30).astype(np.float32)  # residual-sized values
    # by hand, SAELens' order: x.to(bf16); x - b_dec (in bf16); @ W_enc + b_enc (in bf16)
    sae_in = x.astype(BF16) - np.asarray(sae.b_dec).astype(BF16)
    assert sae_in.dtype == BF16
    want = jnp.asarray(sae_in) @ sae.W_enc + sae.b_enc[None]
    got = encode_pre(sae, jnp.asarray(x))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    # the input rounded first gives the very same latents: only the SAE's dtype counts
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(encode_pre(sae, jnp.asarray(x, jnp.bfloat16)), np.float32))
    # the old order (subtract in float32, then round) is measurably different on these inputs
    old = jnp.asarray((x - np.asarray(sae.b_dec, np.float32)).astype(BF16)) @ sae.W_enc + sae.b_enc[None]
    assert np.abs(np.asarray(old, np.float32) - np.asarray(want, np.float32)).max() > 1e-2


def test_bf16_subset_encoder_matches_the_full_encoder():
    sae = _bf16_sae(activation="jumprelu")
    x = jnp.asarray((np.random.default_rng(2).standard_normal((5, 64)) * 30).astype(np.float32))
    ids = jnp.array([0, 7, 50, 95])
    np.testing.assert_array_equal(np.asarray(encode_features(sae, x, ids), np.float32),
                                  np.asarray(encode(sae, x)[..., ids], np.float32))


def test_float32_sae_is_unchanged_for_float32_input():
    from jaxrecover.sae.autoencoder import astype

    sae = astype(_bf16_sae(), jnp.float32)
    x = (np.random.default_rng(3).standard_normal((4, 64)) * 30).astype(np.float32)
    want = (x - np.asarray(sae.b_dec)) @ np.asarray(sae.W_enc) + np.asarray(sae.b_enc)
    np.testing.assert_allclose(np.asarray(encode_pre(sae, jnp.asarray(x))), want, rtol=1e-5, atol=1e-4)


# ---- 4. Gemma Scope hook inference from inside a symlinked snapshot folder, relative path


def _gs_arrays(d_in=8, d_sae=16):
    rng = np.random.default_rng(0)
    return {"W_enc": rng.standard_normal((d_in, d_sae)).astype(np.float32), "b_enc": np.zeros(d_sae, np.float32),
            "W_dec": rng.standard_normal((d_sae, d_in)).astype(np.float32), "b_dec": np.zeros(d_in, np.float32),
            "threshold": np.full(d_sae, 0.1, np.float32)}


@pytest.mark.parametrize("arg", ["params.npz", ".", "./params.npz"])
def test_gemma_scope_relative_path_inside_a_symlinked_snapshot(tmp_path, monkeypatch, arg):
    # before: os.path.abspath joined the kernel's cwd (every link resolved: .../blobs/<hash>/...), which
    # has no release or layer folder: "cannot infer the hook name"
    repo = tmp_path / "hub" / "models--google--gemma-scope-2b-pt-res"
    store = tmp_path / "blobs" / "d41d8cd98f00"  # content-addressed: no release name on the physical path
    leaf = store / "layer_5" / "width_16k" / "average_l0_20"
    leaf.mkdir(parents=True)
    np.savez(leaf / "params.npz", **_gs_arrays())
    (repo / "snapshots").mkdir(parents=True)
    (repo / "snapshots" / "abc123").symlink_to(Path("..") / ".." / ".." / "blobs" / "d41d8cd98f00")  # <rev> -> blobs
    logical = repo / "snapshots" / "abc123" / "layer_5" / "width_16k" / "average_l0_20"
    monkeypatch.chdir(logical)
    monkeypatch.setenv("PWD", str(logical))  # what the shell sets after `cd` through the link
    assert os.getcwd() != str(logical)  # the kernel's answer lost the snapshot folder
    assert load_sae(arg).hook_name == "blocks.5.hook_resid_post"
    monkeypatch.chdir(repo / "snapshots" / "abc123" / "layer_5")
    monkeypatch.setenv("PWD", str(logical.parent.parent))
    assert load_sae("width_16k/average_l0_20").hook_name == "blocks.5.hook_resid_post"


def test_a_stale_pwd_is_ignored(tmp_path, monkeypatch):
    leaf = tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_9"
    leaf.mkdir(parents=True)
    np.savez(leaf / "params.npz", **_gs_arrays())
    monkeypatch.chdir(leaf)
    monkeypatch.setenv("PWD", str(tmp_path / "gemma-scope-2b-pt-res" / "layer_7"))  # another (absent) folder
    assert load_sae("params.npz").hook_name == "blocks.3.hook_resid_post"


def test_sparsify_dot_inside_its_layer_folder(tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    folder = tmp_path / "layers.6"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"d_in": 8, "k": 2, "num_latents": 16}))
    save_file({"encoder.weight": np.ones((16, 8), np.float32), "encoder.bias": np.zeros(16, np.float32),
               "W_dec": np.ones((16, 8), np.float32), "b_dec": np.zeros(8, np.float32)}, str(folder / "sae.safetensors"))
    monkeypatch.chdir(folder)
    assert load_sae(".").hook_name == "blocks.6.hook_resid_post"  # before: '' (Path('.').name)


# ---- 5. output folders


def test_symlinked_out_is_refused_before_anything_loads(tmp_path, monkeypatch, capsys):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    monkeypatch.setattr(C, "load_model", _no_model)
    for setting in ("ioi", "refusal"):
        code = cli.main(["--no-compile-cache", "run", setting, "--out", str(link)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "symbolic link" in err[0] and str(link) in err[0], err
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(SystemExit, match="symbolic link"):
        C.out_dir(str(dangling), "x")
    with pytest.raises(SystemExit, match="symbolic link"):
        C.check_writable(link)
    assert list(real.iterdir()) == []  # nothing written through the link
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoints").symlink_to(real)  # the resume store somewhere else
    with pytest.raises(SystemExit, match=r"checkpoints: is a symbolic link"):
        C.check_writable(out)


def test_atomic_writer_replaces_a_symlinked_file_instead_of_writing_through_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.json").symlink_to(victim)
    report.write_json(tmp_path / "out" / "summary.json", {"a": 1})
    assert victim.read_text() == "keep me"
    assert not (tmp_path / "out" / "summary.json").is_symlink()


def _sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_two_runs_into_one_folder_refuse(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    other = _sleeper()  # a live process that holds the folder
    try:
        (out / report.LOCK_NAME).write_text(json.dumps({"pid": other.pid, "host": os.uname().nodename}))
        monkeypatch.setattr(C, "load_model", _no_model)
        code = cli.main(["--no-compile-cache", "run", "ioi", "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and f"pid {other.pid}" in err[0] and "another jaxrecover run" in err[0]
    finally:
        other.kill()
        other.wait()
    # its process is gone: the lock is stale, the next run takes it over (kill -9 leaves one behind)
    C.check_writable(out)
    assert json.loads((out / report.LOCK_NAME).read_text())["pid"] == os.getpid()
    C.check_writable(out)  # the same process again (runs one after another): fine


def test_lock_is_released_at_exit_and_a_second_process_waits_its_turn(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    hold = ("import sys, time; from pathlib import Path; from jaxrecover.experiment import common as C; "
            "C.check_writable(Path(sys.argv[1])); print('locked', flush=True); time.sleep(float(sys.argv[2]))")
    first = subprocess.Popen([sys.executable, "-c", hold, str(out), "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "locked"
        second = subprocess.run([sys.executable, "-c", hold, str(out), "0"], capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and f"pid {first.pid}" in second.stderr  # SystemExit(str) outside the CLI: 1
    finally:
        first.kill()
        first.wait()
    done = subprocess.run([sys.executable, "-c", hold, str(out), "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr  # the killed holder's lock was stale
    assert not (out / report.LOCK_NAME).exists()  # and a normal exit releases it


def test_a_kill_mid_write_leaves_no_partial_file_and_its_temp_is_removed(tmp_path):
    out = tmp_path / "out"
    (out / "records" / "r").mkdir(parents=True)
    report.write_json(out / "summary.json", {"old": True})
    # a writer SIGKILLed after writing half its data: what it leaves is a temp name, never the file
    code = ("import os, sys; from pathlib import Path; from jaxrecover.runtime import report; "
            "p = Path(sys.argv[1]); t = report.temp_name(p); t.write_text('{\"new\": tr'); "
            "os.kill(os.getpid(), 9)")
    for target in (out / "summary.json", out / "records" / "r" / "batch00000.jsonl"):
        subprocess.run([sys.executable, "-c", code, str(target)])
    temps = sorted(p.name for p in out.rglob("*.tmp"))
    assert len(temps) == 2 and all(t.startswith(".") for t in temps)
    assert json.loads((out / "summary.json").read_text()) == {"old": True}  # old file whole
    assert list((out / "records" / "r").glob("batch*.jsonl")) == []  # the runner's glob never sees a temp
    C.check_writable(out)  # the next run cleans what killed runs left
    assert list(out.rglob("*.tmp")) == []
    mine = report.temp_name(out / "x.json")  # a live writer's temp (this process) is kept
    mine.write_text("")
    assert report.remove_stale_temps(out) == [] and mine.exists()


def test_runner_writes_through_the_one_atomic_writer(tmp_path, monkeypatch):
    from jaxrecover.recover import batch as runner

    seen = []
    real = report.atomic_write_bytes

    def spy(path, data):
        seen.append(Path(path).name)
        real(path, data)

    monkeypatch.setattr(report, "atomic_write_bytes", spy)
    runner._write_atomic(tmp_path / "k.txt", "abc")
    runner._save_npy(tmp_path / "d.npy", np.arange(3))
    assert seen == ["k.txt", "d.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "d.npy"), np.arange(3))


# ---- 5. resume after a changed flag: refused or fresh, never mixed


def test_resume_after_a_changed_solver_flag_starts_fresh(tmp_path, capsys):
    from test_checkpoint import _problem

    from jaxrecover.recover import solver as R
    from jaxrecover.recover import batch as runner

    solver, model, ex, clamps = _problem()  # 3 examples, 6 steps in chunks of 2; one batch on 4 devices
    assert runner.run_recovery(solver, model, ex, clamps, tmp_path / "a", run_id="r", batch_size=4, progress=False,
                               stop_after_chunks=2) is None  # killed mid-batch: a checkpoint at step 4
    assert any((tmp_path / "a" / "checkpoints" / "r" / "batch00000").iterdir())
    changed = R.make_solver(solver.problem, solver.cfg.replace(lr=0.03), solver.objective, solver.success)
    got = runner.run_recovery(changed, model, ex, clamps, tmp_path / "a", run_id="r", batch_size=4, progress=False)
    assert "starting fresh" in capsys.readouterr().err
    ref = runner.run_recovery(changed, model, ex, clamps, tmp_path / "ref", run_id="r", batch_size=4, progress=False)
    a, b = report.read_jsonl(tmp_path / "a" / "r.jsonl"), report.read_jsonl(tmp_path / "ref" / "r.jsonl")
    assert a == b and got["all"] == ref["all"]
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "r_deltas.npy"), np.load(tmp_path / "ref" / "r_deltas.npy"))
    # the batch layout (--per-device-batch, device count) is part of the key too
    runner.run_recovery(changed, model, ex, clamps, tmp_path / "a", run_id="r", batch_size=4, progress=False,
                        per_device_batch=2)
    assert "starting fresh" in capsys.readouterr().err
    runner.run_recovery(changed, model, ex, clamps, tmp_path / "a", run_id="r", batch_size=4, progress=False,
                        per_device_batch=2)
    assert "starting fresh" not in capsys.readouterr().err  # same inputs: resumed (all batches done)


def test_content_keyed_store_never_reads_a_result_of_other_flags(tmp_path):
    from test_checkpoint import _problem

    from jaxrecover.recover import solver as R
    from jaxrecover.experiment import suite as S

    solver, model, ex, clamps = _problem()
    store = tmp_path / "checkpoints"
    first = S.run_solver(solver, model, ex, clamps, store=store, progress=False)
    other = R.make_solver(solver.problem, solver.cfg.replace(budget=0.5), solver.objective, solver.success)
    second = S.run_solver(other, model, ex, clamps, store=store, progress=False)
    fresh = S.run_solver(other, model, ex, clamps, progress=False)
    np.testing.assert_array_equal(np.asarray(second.result.delta), np.asarray(fresh.result.delta))
    assert not np.array_equal(np.asarray(first.result.delta), np.asarray(second.result.delta))
    assert len([p for p in store.iterdir() if p.name.startswith("solve_")]) == 2


# ---- 5. environment variables with garbage values: one line, exit 2


_ENV_CASES = [
    ({"JAXRECOVER_PER_DEVICE_BATCH": "abc"}, "JAXRECOVER_PER_DEVICE_BATCH='abc'"),
    ({"JAXRECOVER_PER_DEVICE_BATCH": "-1"}, "JAXRECOVER_PER_DEVICE_BATCH='-1'"),
    ({"JAXRECOVER_NUM_PROCESSES": "-1"}, "JAXRECOVER_NUM_PROCESSES"),
    ({"JAXRECOVER_NUM_PROCESSES": "abc"}, "JAXRECOVER_NUM_PROCESSES='abc'"),
    ({"JAXRECOVER_NUM_PROCESSES": "-1", "JAXRECOVER_PROCESS_ID": "0", "JAXRECOVER_COORDINATOR": "localhost:1"},
     "num_processes must be >= 1"),
    ({"JAXRECOVER_NUM_PROCESSES": "2", "JAXRECOVER_PROCESS_ID": "5", "JAXRECOVER_COORDINATOR": "localhost:1"},
     "5"),
    ({"JAXRECOVER_NUM_PROCESSES": "2", "JAXRECOVER_PROCESS_ID": "0", "JAXRECOVER_COORDINATOR": "localhost:http"},
     "HOST:PORT"),
    ({"JAXRECOVER_INIT_TIMEOUT": "soon"}, "JAXRECOVER_INIT_TIMEOUT='soon'"),
    ({"JAXRECOVER_INIT_TIMEOUT": "-5"}, "JAXRECOVER_INIT_TIMEOUT='-5'"),
    ({"JAXRECOVER_DISTRIBUTED": "yes"}, "JAXRECOVER_DISTRIBUTED='yes'"),
    ({"JAXRECOVER_SAE_WEIGHTS": "/no/such/folder"}, "JAXRECOVER_SAE_WEIGHTS='/no/such/folder'"),
    ({"JAXRECOVER_CACHE": "/dev/null/cache"}, "JAXRECOVER_CACHE='/dev/null/cache' cannot be created"),
]


@pytest.mark.parametrize("env, needle", _ENV_CASES, ids=[",".join(f"{k}={v}" for k, v in e.items()) for e, _ in _ENV_CASES])
def test_garbage_environment_is_one_line_exit_2(tmp_path, monkeypatch, capsys, env, needle):
    # before: JAXRECOVER_PER_DEVICE_BATCH=abc and JAXRECOVER_INIT_TIMEOUT=soon were a bare int() message
    # (exit 1 / unnamed), JAXRECOVER_DISTRIBUTED=yes and a missing JAXRECOVER_SAE_WEIGHTS were ignored
    for k in [k for k in os.environ if k.startswith("JAXRECOVER_") and k != "JAXRECOVER_COMPILATION_CACHE"]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(C, "load_model", _no_model)
    try:
        code = cli.main(["--no-compile-cache", "run", "ioi", "--out", str(tmp_path / "out")])
    except SystemExit as e:  # argparse and start_distributed exit(2) themselves
        code = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, err
    if "JAXRECOVER_SAE_WEIGHTS" in env:  # a Config value: argparse prints its usage block, then the message
        err = err[-1:]
    assert len(err) == 1 and needle in err[0], err


def test_sae_training_resume_marker_is_written_atomically(llama_model, tmp_path, monkeypatch):
    # before: harvest's '<file>.done' marker (int() read back on resume) was written in place: a kill
    # mid-write left '' and the rerun died on int('')
    from jaxrecover.sae import train as ts
    from jaxrecover.core.sites import Site

    written = []
    real = ts.replace_file
    monkeypatch.setattr(ts, "replace_file", lambda p, d: (written.append(Path(p).name), real(p, d)))
    chunks = np.random.default_rng(0).integers(0, llama_model.cfg.d_vocab, (3, 6)).astype(np.int32)
    ts.harvest(llama_model, chunks, [Site(0, "resid_post")], [tmp_path / "l0.f16"], batch_chunks=2, progress=False)
    assert written == ["l0.f16.done"] and (tmp_path / "l0.f16.done").read_text() == "3"
    assert list(tmp_path.glob(".*")) == []  # no temp left behind
