"""SmolLM2 (embedded default) + shipped layer-9 SAE: solve_batch + generation under clamp + delta, in
one layout. Usage: python real_layouts.py OUT LAYOUT [PORT PID]   (LAYOUT: 1x1 | 1x4 | 2x2)."""
import os, sys, time, json
out, layout = sys.argv[1], sys.argv[2]
n_proc, n_dev = map(int, layout.split("x"))
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_dev}"
t_start = time.time()
from jaxrecover.runtime import distributed as distributed
if n_proc > 1:
    distributed.initialize(f"127.0.0.1:{sys.argv[3]}", n_proc, int(sys.argv[4]), timeout_s=60)
import jax, jax.numpy as jnp, numpy as np
import jaxrecover as jxr
from jaxrecover.model.tokenizer import apply_chat_template, encode_batch
from jaxrecover.sae.clamp import AddDelta, Clamp, compose

model, tok = jxr.load_default()
sae = jxr.load_sae(jxr.shipped_sae(9))
site = jxr.Site.parse(sae.hook_name)
features = jnp.array([112, 417, 965, 1014, 1099])
clamps = {site: jxr.Clamp(sae, features, jnp.full(5, 6.0), mode="floor")}
qa = [("Give me three tips for a job interview.", "1. Research the company before the interview."),
      ("How do I bake bread at home?", "Mix flour, water, yeast and salt, then knead the dough."),
      ("What is the capital of France?", "The capital of France is Paris, on the Seine."),
      ("Write a haiku about autumn.", "Crimson leaves falling, whispering to the cold ground."),
      ("Explain photosynthesis briefly.", "Plants turn light, water and carbon dioxide into sugar."),
      ("Suggest a name for a cat.", "How about Whiskers? It is classic and friendly.")]
prompts = [apply_chat_template(tok, q) for q, _ in qa]
tokens, valid = encode_batch(tok, [p + a for p, (_, a) in zip(prompts, qa)])
n, S = tokens.shape
n_ans = valid.sum(1) - encode_batch(tok, prompts)[1].sum(1)
first = S - n_ans - 1
R = int(n_ans.min())
weights = np.zeros(tokens.shape, np.float32)
for i in range(n):
    weights[i, first[i]:-1] = 1.0
ex = jxr.Example(tokens=tokens[:, None], valid=valid[:, None],
                 delta_slots=np.tile(np.arange(S - 1 - R, S - 1, dtype=np.int32), (n, 1)),
                 measure_mask=valid.copy(),
                 target=jxr.objectives.Continuation(ids=np.roll(tokens, -1, axis=1)[:, None], weights=weights[:, None],
                                         answer_start=first.astype(np.int32), discouraged=np.full((n, 1), -1)))
solver = jxr.make_solver(jxr.RecoveryProblem(delta_site=site, clamp_sites=(site,)),
                         jxr.RecoveryConfig(steps=20, lr=0.05, budget=40.0, constraint=jxr.EncoderNull()),
                         jxr.objectives.continuation_logprob, jxr.objectives.continuation_success)
t_load = time.time() - t_start
t0 = time.time()
res = jxr.solve_batch(solver, model, ex, clamps)
jax.block_until_ready(res.delta)
t_solve = time.time() - t0
P = encode_batch(tok, prompts, pad_to=S)  # not used: generation continues the teacher-forced prefix below
hooks = {site: compose(clamps[site], AddDelta(res.delta, ex.delta_slots))}
axes = {site: compose(Clamp(None, None, None, mode="floor"), AddDelta(0, 0))}
t0 = time.time()
gen = jxr.generate(model, tokens, valid, max_new_tokens=8, hooks=hooks, hooks_in_axes=axes, eos_id=tok.eos_id)
jax.block_until_ready(gen.tokens)
t_gen = time.time() - t0
if distributed.is_writer():
    np.savez(os.path.join(out, f"{layout}.npz"), objective=np.asarray(res.objective), success=np.asarray(res.success),
             clamped=np.asarray(res.clamped_objective), base=np.asarray(res.base_objective), delta=np.asarray(res.delta),
             drift=np.asarray(res.metrics["drift_rel"]), gen=np.asarray(gen.tokens))
    json.dump({"layout": layout, "devices": len(jax.devices()), "processes": jax.process_count(),
               "load_s": t_load, "solve_s": t_solve, "generate_s": t_gen, "total_s": time.time() - t_start,
               "seq": S, "rows": R}, open(os.path.join(out, f"{layout}.json"), "w"))
print("done", layout, jax.process_index(), f"solve {t_solve:.1f}s gen {t_gen:.1f}s", flush=True)
