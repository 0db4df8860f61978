"""What the study's second model size costs on this machine (issue 21, item 3), projected in a few minutes.

Times, at the study zoo's size and at study_4x's (evomerge/conf/zoo/study_4x.yaml: the same recipe on a ~4x larger
foundation, hidden 256 and intermediate 768), a few
pretraining steps, a few expert fine-tuning steps and one held-in evaluation (50 search questions), all in the same
run on the same data with the zoo's build threads, and projects the whole build (base pretraining, instruction tune,
16 experts) and the study's merges-and-scoring from the study zoo's own step counts. The ratio column compares the
larger size with the study zoo's size measured here. Needs the default zoo (built on first use).

    .venv/bin/python scripts/study_size_cost.py [--steps 10]
"""

from __future__ import annotations

import argparse
import time

import yaml

from evomerge.eval.evaluator import Evaluator
from evomerge.eval.task import load_task
from evomerge.modelio import load_tokenizer
from evomerge.resources import CONF_DIR
from evomerge.zoo import corpus
from evomerge.zoo.build import build_zoo, new_base, reproducible_torch
from evomerge.zoo.study_zoo import load_study_zoo_spec
from evomerge.zoo.train import finetune, pretrain

SIZES = {"study zoo (1x)": "study", "study_4x": "study_4x"}  # label: evomerge/conf/zoo/<name>.yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="training steps timed per size and kind")
    parser.add_argument("--home", default="~/.cache/evomerge")
    args = parser.parse_args()
    study = load_study_zoo_spec(yaml.safe_load((CONF_DIR / "zoo" / "study.yaml").read_text()))
    spec = study.foundation_spec
    zoo = build_zoo(spec, args.home)
    tokenizer = load_tokenizer(zoo / "base")
    documents = corpus.pretraining_documents(0, 2000, spec.pretrain_qa_fraction, set())
    task = load_task("toy_en_math", {"zoo_dir": str(zoo)})
    pairs = [(task.build_prompt(e.question), e.completion)
             for e in corpus.training_examples("toy_en_math", 0, 200, set())]
    expert_steps = sum(study.expert_steps_for.get(t, study.expert_steps) for t in study.held_in) * 2  # both kinds
    rows = {}
    with reproducible_torch():
        for name, config in SIZES.items():
            sized = load_study_zoo_spec(yaml.safe_load((CONF_DIR / "zoo" / f"{config}.yaml").read_text()))
            model = new_base(sized.foundation_spec, tokenizer)
            params = sum(p.numel() for p in model.parameters())
            pretrain(model, tokenizer, documents, steps=1, batch_size=spec.batch_size, seq_len=spec.seq_len,
                     lr=spec.pretrain_lr, seed=0, desc="warm-up")
            started = time.perf_counter()
            pretrain(model, tokenizer, documents, steps=args.steps, batch_size=spec.batch_size, seq_len=spec.seq_len,
                     lr=spec.pretrain_lr, seed=0, desc=f"{name} pretrain")
            pre = (time.perf_counter() - started) / args.steps
            started = time.perf_counter()
            finetune(model, tokenizer, pairs, steps=args.steps, batch_size=spec.batch_size, lr=1e-3, seed=0,
                     desc=f"{name} fine-tune")
            tune = (time.perf_counter() - started) / args.steps
            evaluator = Evaluator(task, "search", tokenizer, batch_size=64, progress=False)
            evaluator.evaluate(model)
            started = time.perf_counter()
            evaluator.evaluate(model)
            evaluate = time.perf_counter() - started
            build = spec.pretrain_steps * pre + (study.instruct_steps + expert_steps) * tune
            rows[name] = {"params": params, "pretrain_step": pre, "finetune_step": tune, "eval": evaluate,
                          "build": build}
    reference = rows["study zoo (1x)"]
    print(f"{'size':<16}{'params':>10}{'pretrain s/step':>17}{'fine-tune s/step':>18}{'eval 50 q (s)':>15}"
          f"{'projected build':>17}{'ratio':>8}")
    for name, row in rows.items():
        print(f"{name:<16}{row['params']:>10,}{row['pretrain_step']:>17.3f}{row['finetune_step']:>18.3f}"
              f"{row['eval']:>15.2f}{row['build'] / 60:>13.1f} min{row['build'] / reference['build']:>8.2f}")
    print(f"projected build = {spec.pretrain_steps} pretraining + {study.instruct_steps} instruction + "
          f"{expert_steps} expert fine-tuning steps (the study zoo's recipe); the study's merges are scored by "
          f"generation, which the eval column scales (ratio {rows['study_4x']['eval'] / reference['eval']:.2f})")


if __name__ == "__main__":
    main()
