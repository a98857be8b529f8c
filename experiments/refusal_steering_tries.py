"""Flip counts of the paper's refusal feature route (harmful - harmless steering vector, top-cosine
candidates, attribution ranking) under a few clamps, on the built-in prompts: which change to the
paper's x3 scale clamp is the smallest that makes SmolLM2 refuse. Writes TRIES.md (one row per try).

    .venv/bin/python experiments/refusal_steering_tries.py --out experiments/results/refusal_steering_variant

Every try keeps the steering-vector selection; only the clamp (and, in the last tries, the candidate
pool) changes. Same flags as ``jaxrecover run refusal`` otherwise (JumpReLU SAE, 48 prompts).
"""

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from jaxrecover.recover import judges as judges
from jaxrecover.experiment import common as C
from jaxrecover.paper import refusal
from jaxrecover.model.tokenizer import encode_batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="experiments/results/refusal_steering_variant")
    ap.add_argument("--n-prompts", type=int, default=48)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = refusal.Config(sae_release="jumprelu", feature_method="steering", clamp_mode="scale", clamp_value=3.0,
                          n_prompts=args.n_prompts, out=str(out))
    prep = refusal.prepare(base)
    model, tok, saes = prep.model, prep.tok, prep.sae
    harm_tok = encode_batch(tok, prep.p_harm, pad_to=8)
    safe_tok = encode_batch(tok, prep.p_safe, pad_to=8)
    feats_by_pool: dict[int, dict] = {}
    # (label, candidates per layer, clamp mode, value, per-feature reference: None | "prompt_active")
    tries = [
        ("paper: x3 scale", 10, "scale", 3.0, None),
        ("x10 scale", 10, "scale", 10.0, None),
        ("x30 scale", 10, "scale", 30.0, None),
        ("floor 3 x mean-when-active on the prompts", 10, "floor", 3.0, "prompt_active"),
        ("floor 10 (absolute)", 10, "floor", 10.0, None),
        ("floor 20 (absolute)", 10, "floor", 20.0, None),
        ("x3 scale, 40 candidates", 40, "scale", 3.0, None),
        ("floor 10, 40 candidates", 40, "floor", 10.0, None),
    ]
    rows = []
    for label, cands, mode, value, ref in tries:
        cfg = dataclasses.replace(base, candidates_per_layer=cands, clamp_mode=mode, clamp_value=value)
        if cands not in feats_by_pool:
            feats_by_pool[cands] = refusal.select_features(model, tok, saes, harm_tok, safe_tok, prep.refusal_ids, cfg)
        feats = feats_by_pool[cands]
        ref_act = None
        if ref is not None:  # per-feature mean activation when active on the prompts (x1 scale: stats only)
            probe = refusal.make_clamps(saes, feats, dataclasses.replace(cfg, clamp_mode="scale", clamp_value=1.0))
            st = refusal.feature_stats(model, tok, probe, prep.p_harm)
            ref_act = {s: np.asarray(st[str(s)]["prompt"]["mean_active"], np.float32) for s in feats}
        clamps = refusal.make_clamps(saes, feats, cfg, ref_act)
        st = refusal.feature_stats(model, tok, clamps, prep.p_harm)
        texts = refusal.gen_with(model, tok, harm_tok, clamps, cfg, desc=label)
        valid = [judges.strict_valid(b, c) for b, c in zip(prep.base_texts, texts)]
        (site, s), = st.items()
        rows.append({
            "try": label, "mode": mode, "value": value, "features": sum(len(f) for f in feats.values()),
            "strict-valid flips": f"{sum(valid)}/{len(valid)}",
            "clamped refusing": sum(judges.is_effective_refusal(t) for t in texts),
            "active on prompt pos.": f"{100 * np.mean(s['prompt']['frac_active']):.2f}%",
            "||clamp(h)-h|| / ||h|| (prompt)": f"{s['prompt']['clamp_change_rel']:.3g}",
            "(last token)": f"{s['last_token']['clamp_change_rel']:.3g}",
            "(compliant text)": f"{s['compliance_text']['clamp_change_rel']:.3g}",
            "values": ", ".join(f"{v:.3g}" for v in s["values"]) if mode == "floor" and ref else "",
        })
        C.say(f"try {label}: {rows[-1]['strict-valid flips']} strict-valid flips")
    from jaxrecover.runtime import report as report

    body = report.markdown_table(rows).replace("||", "‖")
    (out / "TRIES.md").write_text(
        "# Refusal, the paper's feature route: clamp tries\n\n"
        f"Command: `.venv/bin/python experiments/refusal_steering_tries.py --out {args.out} --n-prompts {args.n_prompts}` "
        "(JumpReLU SAE at blocks.9.hook_resid_post, steering-vector selection with --n-features 20, "
        f"{args.n_prompts} built-in harmful prompts, 40 greedy tokens). Ratios are mean ‖clamp(h) - h‖ over mean ‖h‖ "
        "on the clean model's residual, per position.\n\n" + body)
    print((out / "TRIES.md").read_text())


if __name__ == "__main__":
    main()
