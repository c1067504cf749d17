"""Leakage: the loss-threshold membership-inference attack on one site's adapter, without DP and under DP-SGD.

    python benchmarks/membership.py [--model smollm2-135m] [--canaries 128] [--steps 120] [--epsilons inf 8 1]

The biggest site of the built-in data gets `--canaries` canary pairs (fed_netgpt/evaluation/leakage.py); a random
half joins its training data. For each epsilon a fresh adapter trains `--steps` steps on it (inf: plain training;
else DP-SGD with the noise derived to end the steps at that epsilon: the site's `SiteJob` with a `SiteAccountant`),
by the engine a site trains with (`engine.train_sites`, one site: K=1; `train.engine=peft` and
`privacy.engine=opacus` pick the reference engines), and the attack scores every canary. Prints the ROC AUC (0.5:
nothing leaks; its spread when nothing leaks is printed too), the calibrated attack's (each canary's loss drop from
the base model's, fed_netgpt/evaluation/leakage.py) and the members' and non-members' mean loss.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace

import torch

from fed_netgpt.config import load_config
from fed_netgpt.data.sites import load_sites
from fed_netgpt.evaluation.leakage import canaries, chance_auc_std, membership_auc, split_members
from fed_netgpt.model.adapters import attach_adapter, get_state, set_state
from fed_netgpt.model.base import load_base
from fed_netgpt.training.engine import SiteJob, train_sites
from fed_netgpt.training.privacy import SiteAccountant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--canaries", type=int, default=128)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[math.inf, 8.0, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.batch_size=8")
    args = parser.parse_args()
    config = load_config(overrides=[f"model.name={args.model}", f"train.local_steps={args.steps}", *args.overrides])
    base = load_base(config.model.name, config.model.cache_dir)
    site = max(load_sites(config.data), key=lambda s: len(s.train))
    members, nonmembers = split_members(canaries(site.site_id, site.region, args.canaries, args.seed), args.seed)
    pairs = [*site.train, *members]
    print(f"{config.model.name}, site {site.site_id}: {len(site.train)} pairs + {len(members)} member canaries "
          f"({len(nonmembers)} non-members), {args.steps} steps of {config.train.batch_size}, "
          f"lr {config.train.learning_rate}, {torch.get_num_threads()} threads; an AUC's spread when nothing leaks: "
          f"± {chance_auc_std(len(members), len(nonmembers)):.3f}")
    print("| epsilon | noise multiplier | attack AUC | calibrated attack AUC | member loss | non-member loss | "
          "train loss (last) | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for epsilon in args.epsilons:
        name = f"eps-{epsilon:g}".replace(".", "_")  # an adapter name has no dots
        model = attach_adapter(base, name, config.lora, seed=args.seed)
        started = time.perf_counter()
        accountant = None  # inf: plain training
        if not math.isinf(epsilon):
            privacy = replace(config.privacy, mode="sample_dp", target_epsilon=epsilon, noise_multiplier=0.0)
            accountant = SiteAccountant(privacy, planned_steps=args.steps, history=[])  # privacy.engine: who trains
        job = SiteJob(site.site_id, pairs, get_state(model, name), seed=args.seed, accountant=accountant)
        (result,) = train_sites(base, [job], config.lora, config.train)
        seconds = time.perf_counter() - started
        set_state(model, name, result.state)  # the attack reads the trained adapter from the peft model
        model.set_adapter(name)  # the reference engines train in an adapter of their own
        attack = membership_auc(model, base.tokenizer, members, nonmembers, config.train.max_length)
        noise = result.metrics.get("noise_multiplier", 0.0)
        print(f"| {'∞' if math.isinf(epsilon) else f'{epsilon:g}'} | {noise:.3f} | {attack['auc']:.3f} | "
              f"{attack['calibrated_auc']:.3f} | {attack['member_loss']:.3f} | {attack['nonmember_loss']:.3f} | "
              f"{result.metrics['train_loss_last']:.3f} | {seconds:.0f} |", flush=True)
        model.delete_adapter(name)


if __name__ == "__main__":
    main()
