"""DP LoRA fine-tuning of a tiny GPT-2 on real English text, character by character.

Data: the prose of Python's standard-library docstrings (every Python install has it; see
``dptorch.datasets.text``), about 90,000 characters cut into 64-character sequences, 90%
train / 10% test. The tokeniser is built here: one id per character seen in the train split.

Model: a 2-layer GPT-2 (``transformers``, randomly initialised: no download), frozen; LoRA
adapters (``peft``, rank 8) on its attention and MLP projections are the only trained
parameters, so per-sample gradients are computed for the adapters alone. The privacy unit is
one sequence: the loss is :func:`dptorch.losses.sequence_mean_cross_entropy` (the model's
own ``labels=`` loss averages over all tokens of the batch and would couple sequences).

    pip install "dptorch[hf]"          # transformers and peft
    python examples/lora_gpt2.py        # about 25 s on 2 cores
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dptorch import PrivacyEngine
from dptorch.datasets.text import stdlib_prose
from dptorch.integrations.huggingface import per_example_position_ids
from dptorch.losses import sequence_mean_cross_entropy

LENGTH = 64


def char_dataset(text: str, vocabulary: dict[str, int]) -> Tensor:
    """``[N, LENGTH]`` ids of consecutive, non-overlapping chunks of ``text``."""
    ids = torch.tensor([vocabulary.get(c, 0) for c in text], dtype=torch.long)
    usable = len(ids) // LENGTH * LENGTH
    return ids[:usable].view(-1, LENGTH)


def build_model(vocab: int, rank: int) -> nn.Module:
    import peft
    import transformers

    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=LENGTH,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="sdpa",
    )
    base = transformers.GPT2LMHeadModel(config)
    lora = peft.LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(base, lora)  # freezes the base, leaves the adapters trainable


def loss_of(model: nn.Module, ids: Tensor) -> Tensor:
    # Positions per example ([B, T]): a broadcast [1, T] lookup would sum the position
    # embedding's gradient over the batch (irrelevant here, it is frozen, but kept right).
    logits = model(
        input_ids=ids, position_ids=per_example_position_ids(ids), use_cache=False
    ).logits
    return sequence_mean_cross_entropy(logits, ids, shift=True)


def evaluate(model: nn.Module, data: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        loss = loss_of(model, data).item()
    model.train()
    return loss


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--batch-size", type=int, default=64, help="expected (Poisson) size")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--epsilon", type=float, default=8.0, help="target epsilon")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    text = stdlib_prose()
    cut = int(0.9 * len(text))
    vocabulary = {c: i + 1 for i, c in enumerate(sorted(set(text[:cut])))}  # 0: unseen
    sequences = char_dataset(text, vocabulary)
    split = int(0.9 * len(sequences))
    train, test = sequences[:split], sequences[split:]
    print(f"{len(train)} train / {len(test)} test sequences of {LENGTH} characters")

    model = build_model(len(vocabulary) + 1, args.rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    print(f"training {sum(p.numel() for p in trainable):,} of {total:,} parameters (LoRA)")
    before = evaluate(model, test)

    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.Adam(trainable, lr=args.lr),
        data_loader=DataLoader(TensorDataset(train), batch_size=args.batch_size),
        target_epsilon=args.epsilon,
        target_delta=args.delta,
        epochs=args.epochs,
        max_grad_norm=args.max_grad_norm,
    )
    steps = 0
    for epoch in range(args.epochs):
        for (ids,) in loader:
            optimizer.zero_grad()
            loss_of(model, ids).backward()
            optimizer.step()
            steps += 1
            if args.steps is not None and steps >= args.steps:
                break
        print(f"epoch {epoch + 1}: eps {engine.get_epsilon(args.delta):.2f}")
        if args.steps is not None and steps >= args.steps:
            break
    result = {
        "test_loss_before": before,
        "test_loss_after": evaluate(model, test),
        "epsilon": engine.get_epsilon(args.delta),
        "steps": float(steps),
        "seconds": time.perf_counter() - start,
    }
    print(
        f"test loss per character {result['test_loss_before']:.3f} -> "
        f"{result['test_loss_after']:.3f}, epsilon {result['epsilon']:.2f} at delta "
        f"{args.delta}, sigma {optimizer.noise_multiplier:.3f}, {steps} steps, "
        f"{result['seconds']:.0f} s"
    )
    return result


if __name__ == "__main__":
    main()
