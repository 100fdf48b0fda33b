"""Hugging Face GPT-2, BERT and peft LoRA under DP, against the one-example-at-a-time oracle.

Tiny configurations with random weights (no download): 2 layers, width 32, vocabulary 100.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dptorch import DPValueError, PrivacyEngine
from dptorch.integrations.huggingface import fill_position_ids, per_example_position_ids
from dptorch.losses import sequence_mean_cross_entropy
from dptorch.per_sample.engine import modules_to_capture
from tests.per_sample.sequence_oracle import Batch, assert_matches_oracle

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore::dptorch.DPWarning")

VOCAB, B, T = 100, 5, 10


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(config).double()


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        type_vocab_size=2,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="sdpa",
    )
    return transformers.BertForSequenceClassification(config).double()


def _lm_batch() -> Batch:
    ids = torch.randint(0, VOCAB, (B, T))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not trained on
    labels[2, 7:] = -100  # padding
    labels[3] = -100  # a sequence with no counted token at all
    return Batch({"ids": (ids, 0), "labels": (labels, 0)})


def _lm_logits(model: nn.Module, b: Batch) -> Tensor:
    ids = b["ids"]
    return model(input_ids=ids, position_ids=per_example_position_ids(ids), use_cache=False).logits


def _lm_losses(model: nn.Module, b: Batch) -> Tensor:
    logits, labels = _lm_logits(model, b), b["labels"]
    return torch.stack(
        [
            sequence_mean_cross_entropy(logits[i : i + 1], labels[i : i + 1], shift=True)
            for i in range(logits.shape[0])
        ]
    )


def _lm_batch_loss(model: nn.Module, b: Batch) -> Tensor:
    return sequence_mean_cross_entropy(_lm_logits(model, b), b["labels"], shift=True)


def test_gpt2_with_tied_embeddings_matches_oracle() -> None:
    model = _gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    # make_private's first step also verifies the captured sums against autograd and
    # checks that no parameter got gradient outside its layer call.
    assert_matches_oracle(model, _lm_losses, _lm_batch(), batch_loss=_lm_batch_loss)


def test_gpt2_conv1d_has_a_one_pass_rule_not_the_torch_func_fallback() -> None:
    from dptorch.per_sample.rules import has_dedicated_rule

    model = _gpt2()
    captured = modules_to_capture(model, frozenset(model.parameters()))
    assert all(has_dedicated_rule(m) for m in captured.values()), [
        path for path, m in captured.items() if not has_dedicated_rule(m)
    ]
    assert any(type(m).__name__ == "Conv1D" for m in captured.values())


def test_bert_sequence_classification_with_padding_matches_oracle() -> None:
    model = _bert()
    ids = torch.randint(0, VOCAB, (B, T))
    attention = torch.ones(B, T, dtype=torch.long)
    attention[1, 6:] = 0
    token_types = torch.zeros(B, T, dtype=torch.long)
    token_types[:, 5:] = 1
    batch = Batch(
        {
            "ids": (ids, 0),
            "attention": (attention, 0),
            "types": (token_types, 0),
            "labels": (torch.randint(0, 3, (B,)), 0),
        }
    )

    def losses(m: nn.Module, b: Batch) -> Tensor:
        logits = m(
            input_ids=b["ids"],
            attention_mask=b["attention"],
            token_type_ids=b["types"],
            position_ids=per_example_position_ids(b["ids"]),
        ).logits
        return nn.functional.cross_entropy(logits, b["labels"], reduction="none")

    assert_matches_oracle(model, losses, batch)


def test_without_per_example_position_ids_the_step_is_refused() -> None:
    # HF broadcasts positions [1, T] over the batch: the position embedding's gradient is
    # already summed over examples, so it cannot be clipped per example.
    model = _gpt2()
    ids = torch.randint(0, VOCAB, (B, T))
    optimizer, engine = _private(model)
    sequence_mean_cross_entropy(model(input_ids=ids).logits, ids, shift=True).backward()
    with pytest.raises(DPValueError, match="different batch sizes"):
        optimizer.step()
    engine.detach(model)


def test_fill_position_ids_adds_per_example_positions_and_keeps_outputs() -> None:
    model = _gpt2()
    ids = torch.randint(0, VOCAB, (B, T))
    reference = model(input_ids=ids).logits
    handle = fill_position_ids(model)
    seen = []
    probe = model.transformer.wpe.register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    torch.testing.assert_close(model(input_ids=ids).logits, reference)
    assert seen == [torch.Size([B, T])]
    handle.remove()
    probe.remove()

    handle = fill_position_ids(model)  # and a private step now goes through
    optimizer, engine = _private(model)
    sequence_mean_cross_entropy(model(ids).logits, ids, shift=True).backward()
    optimizer.step()
    engine.detach(model)
    handle.remove()


def _private(model: nn.Module) -> tuple[torch.optim.Optimizer, PrivacyEngine]:
    engine = PrivacyEngine()
    loader = DataLoader(TensorDataset(torch.zeros(40, 1)), batch_size=8)
    trainable = [p for p in model.parameters() if p.requires_grad]
    _, optimizer, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(trainable, lr=0.1),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    return optimizer, engine


# -- peft LoRA --------------------------------------------------------------------------------
def _lora_gpt2() -> nn.Module:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_fc"],
        fan_in_fan_out=True,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(_gpt2().float(), config).double()
    with torch.no_grad():  # LoRA starts with B = 0; move off it so every adapter has gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    return model


def test_lora_gpt2_trains_only_adapters_and_matches_oracle() -> None:
    model = _lora_gpt2()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    captured = modules_to_capture(
        model, frozenset(p for p in model.parameters() if p.requires_grad)
    )
    # Per-sample work only for the adapters: frozen base layers are not even hooked.
    assert {type(m) for m in captured.values()} == {nn.Linear}
    assert all(".lora_A." in path or ".lora_B." in path for path in captured)
    assert_matches_oracle(model, _lm_losses, _lm_batch(), batch_loss=_lm_batch_loss)


# -- the loss ---------------------------------------------------------------------------------
def test_sequence_mean_cross_entropy_averages_tokens_then_sequences() -> None:
    logits = torch.randn(3, 4, 7, dtype=torch.float64)
    labels = torch.randint(0, 7, (3, 4))
    labels[0, 2:] = -100
    labels[2] = -100
    token = nn.functional.cross_entropy(
        logits.reshape(12, 7), labels.clamp(min=0).reshape(12), reduction="none"
    ).view(3, 4)
    expected = (token[0, :2].mean() + token[1].mean() + 0.0) / 3
    torch.testing.assert_close(sequence_mean_cross_entropy(logits, labels), expected)
    shifted = sequence_mean_cross_entropy(logits, labels, shift=True)
    torch.testing.assert_close(shifted, sequence_mean_cross_entropy(logits[:, :-1], labels[:, 1:]))
    empty = sequence_mean_cross_entropy(logits[:0], labels[:0])
    assert empty.item() == 0.0


def test_sequence_loss_keeps_examples_apart_unlike_a_token_mean() -> None:
    # Example 0's gradient (times B, as the engine reads it) must not depend on how many
    # tokens the other examples have. A mean over all tokens of the batch fails this.
    logits = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (2, 6))

    def grad_of_first(loss_fn: object, other_tokens: int) -> Tensor:
        masked = labels.clone()
        masked[1, other_tokens:] = -100
        (grad,) = torch.autograd.grad(loss_fn(logits, masked), logits)  # type: ignore[operator]
        return grad[0]

    ours = [grad_of_first(sequence_mean_cross_entropy, n) for n in (1, 6)]
    torch.testing.assert_close(ours[0], ours[1])

    def token_mean(x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.cross_entropy(x.reshape(-1, 5), y.reshape(-1), ignore_index=-100)

    theirs = [grad_of_first(token_mean, n) for n in (1, 6)]
    assert not torch.allclose(theirs[0], theirs[1])


def test_sequence_loss_refuses_model_outputs_of_the_wrong_shape() -> None:
    with pytest.raises(DPValueError, match=r"logits \[B, T, V\]"):
        sequence_mean_cross_entropy(torch.randn(3, 7), torch.zeros(3, dtype=torch.long))
