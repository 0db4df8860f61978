"""Small, deterministic CPU training loops: causal-LM pretraining on packed text and answer-only fine-tuning."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup


def _optimizer(model: PreTrainedModel, lr: float, steps: int):
    """AdamW over the parameters that train (frozen ones keep the base's values exactly, weight decay included)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    return optimizer, get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)


def _step(model, optimizer, scheduler, input_ids, labels, attention_mask=None) -> float:
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def pretrain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[str],
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    seed: int,
    desc: str = "pretrain",
) -> list[float]:
    """Next-token training on documents packed end to end (EOS between them) into fixed-length rows."""
    ids: list[int] = []
    for doc in documents:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    rows = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    needed = steps * batch_size
    if len(rows) < needed:
        raise ValueError(f"{desc}: corpus gives {len(rows)} rows of {seq_len} tokens, {needed} needed; add documents")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:needed]
    torch.manual_seed(seed)
    model.train()
    optimizer, scheduler = _optimizer(model, lr, steps)
    losses = []
    for step in (bar := tqdm(range(steps), desc=desc, leave=False, mininterval=2)):
        batch = rows[order[step * batch_size : (step + 1) * batch_size]]
        losses.append(_step(model, optimizer, scheduler, batch, batch))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    desc: str = "finetune",
) -> list[float]:
    """Supervised fine-tuning on (prompt, completion) pairs with the loss on the completion and EOS only."""
    encoded = []
    for prompt, completion in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        encoded.append((p + c, [-100] * len(p) + c))
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    optimizer, scheduler = _optimizer(model, lr, steps)
    losses = []
    epoch_order: list[int] = []
    for step in (bar := tqdm(range(steps), desc=desc, leave=False, mininterval=2)):
        if len(epoch_order) < batch_size:
            epoch_order += rng.sample(range(len(encoded)), len(encoded))
        batch = [encoded[i] for i in epoch_order[:batch_size]]
        del epoch_order[:batch_size]
        width = max(len(ids) for ids, _ in batch)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        losses.append(_step(model, optimizer, scheduler, input_ids, labels, mask))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def mean_tail(losses: Sequence[float], fraction: float = 0.1) -> float:
    """Mean of the last `fraction` of a loss curve: a steadier summary than the last step."""
    tail = losses[-max(1, math.ceil(len(losses) * fraction)) :]
    return sum(tail) / len(tail)
