"""A new setting is one file: a toy setting, defined entirely here on a tiny random model, runs through
the one driver (files, records, replays, random control), the sweeps and the report, and touches no
other file of the package."""

import dataclasses
import json
import types

import jax
import jax.numpy as jnp
import numpy as np

from jaxrecover.recover import objectives as O
from jaxrecover.recover import solver as R
from jaxrecover import testing
from jaxrecover.sae.clamp import Clamp
from jaxrecover.paper import all as A
from jaxrecover.experiment import common as C
from jaxrecover.experiment import driver as D
from jaxrecover.experiment import suite as S
from jaxrecover.paper import sweeps
from jaxrecover.core.sites import Site


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(C.RunConfig):
    n_prompts: int = dataclasses.field(default=5, metadata={"help": "random prompts"})


@dataclasses.dataclass
class Prepared(S.Prepared):
    tokens: np.ndarray
    seconds: float = 0.0


def prepare(cfg, model=None, tok=None, sae=None):
    mcfg = testing.tiny_config("llama")
    model = testing.random_transformer(jax.random.PRNGKey(0), mcfg)
    sae = testing.random_sae(mcfg.d_model, 32, hook_name="blocks.0.hook_resid_post")
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (cfg.n_prompts, 6), 3, mcfg.d_vocab), np.int32)
    return Prepared(cfg, model, None, Site(0, "resid_post"), sae, "toy-sae", tokens)


def case(prep, k):
    """Zero-ablate the first k features; recover the logit of token 1 over token 2 at the last slot."""
    n, seq = prep.tokens.shape
    last = jnp.full((n, 1), seq - 1, jnp.int32)
    ex = R.Example(tokens=jnp.asarray(prep.tokens[:, None]), valid=jnp.ones((n, 1, seq), bool), delta_slots=last,
                   measure_mask=jnp.zeros((n, seq), bool).at[:, -1].set(True),
                   target=O.LogitDiffTarget(slot=last, io=jnp.ones((n, 1), jnp.int32), s=jnp.full((n, 1), 2, jnp.int32)))
    clamps = {prep.site: Clamp(prep.sae, jnp.arange(k), jnp.zeros(k, jnp.float32), mode="zero")}
    return D.Case(clamps, ex, np.ones(n, bool), [{"prompt": i} for i in range(n)], O.logit_diff, O.logit_diff_success,
                  {"n_features": k}, prep.site)


def methods(prep, case, used):
    return [D.Method(m, m, replay=m == "none") for m in ("none", "encoder")]


def table_rows(res):
    return [{"metric": "recovery", **{m: S.cell(s, "recovered") for m, s in res["modes"].items()}}]


SETTING = D.Setting(name="toy", title="Toy setting", Config=Config, prepare=prepare, case=case, methods=methods,
                    table_rows=table_rows, notes=lambda prep, res: "A toy.\n", plot=lambda out, res: None,
                    load=lambda cfg: None)


def test_a_setting_defined_in_one_file_runs_through_driver_sweeps_and_report(tmp_path):
    cfg = Config(out=str(tmp_path / "toy"), n_features=4, steps=3, budget=5.0, max_flips=3, random_control=2)
    summary = D.run(SETTING, cfg)
    out = tmp_path / "toy"
    for f in ("results.jsonl", "summary.json", "table.md", "toy.csv"):
        assert (out / f).is_file(), f
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    modes = ("none", "encoder", "replay_clamped_feature", "replay_sae_residual")
    assert [r["mode"] for r in rows] == [m for m in modes for _ in range(3)]  # max_flips caps every method
    assert summary["n_recovered_on"] == 3 and summary["flip_indices"] == [0, 1, 2]
    for r in rows[:6]:  # solved deltas stay in the budget; replayed parts are not clipped
        assert r["delta_norm"] <= 5.0 * (1 + 1e-4) and r["status"] in ("recovered", "not_recovered")
    assert max(r["drift_abs"] for r in rows if r["mode"] == "encoder") < 1e-4  # encoder-null leaves z_S put
    for m in ("none", "encoder"):  # the driver's random control, per recovered delta
        rc = summary["modes"][m].get("random_control")
        assert rc is None or rc["random"]["n"] == 2 * rc["n_recovered"]
    stages = json.loads((out / "summary.json").read_text())["stage_s"]
    for m in ("none", "encoder"):  # one wall time per solve: the method's seconds are its stage's
        assert abs(summary["modes"][m]["seconds"] - stages[f"solve: toy {m}"]) <= 0.1 * stages[f"solve: toy {m}"] + 0.5
    # the sweeps drive it through the same driver: budget 0 leaves delta at 0
    module = types.SimpleNamespace(SETTING=SETTING, Config=Config)
    prep = prepare(cfg)
    swept = sweeps.run_sweep(sweeps.Config(setting="ioi", kind="budget", budgets=(0.0, 5.0), constraints=("encoder",)),
                             module, prepared=prep)
    assert swept["joint_budgets"] and [p["x"] for p in swept["points"]] == [0.0, 5.0]
    assert swept["points"][0]["summary"]["delta_norm"]["mean"] == 0.0
    ks = sweeps.run_sweep(sweeps.Config(setting="ioi", kind="k", ks=(2, 4), constraints=("none",)), module, prepared=prep)
    assert [p["summary"]["n"] for p in ks["points"]] == [3, 3]
    # and the report picks its folder up without being told about it
    text = A.write_report(tmp_path).read_text()
    assert "toy" in text and "A toy." in text
