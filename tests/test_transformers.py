"""losskit.integrations.transformers against the models' own losses (transformers 5.24).

The oracle of every test is the same model, same weights, same inputs, unpatched: tiny
models built from configs (no download), in float32, on CPU."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import transformers
from torch import nn
from transformers import (
    CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, GraniteConfig,
    GraniteForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, MistralConfig,
    MistralForCausalLM, PhiConfig, PhiForCausalLM, Qwen2Config, Qwen2ForCausalLM, Trainer, TrainingArguments,
)

from losskit.integrations.transformers import restore, use_linear_cross_entropy, using_linear_cross_entropy

VOCAB, SEQ = 512, 12
ATTENTION = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, **ATTENTION)


def _llama() -> nn.Module:
    return LlamaForCausalLM(LlamaConfig(**SMALL))


def _qwen2_tied() -> nn.Module:
    return Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True))


def _gemma2_softcap() -> nn.Module:
    # A cap of 3 bites at the logits of an untrained model (|z| ~ 1-4), so folding it wrong shows.
    config = Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=3.0, attn_logit_softcapping=50.0,
                          sliding_window=8, tie_word_embeddings=True)
    return Gemma2ForCausalLM(config)


def _mistral() -> nn.Module:
    return MistralForCausalLM(MistralConfig(**SMALL, sliding_window=8))


def _gpt2() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def _granite_scaled() -> nn.Module:  # logits / logits_scaling
    return GraniteForCausalLM(GraniteConfig(**SMALL, logits_scaling=4.0))


def _cohere_scaled() -> nn.Module:  # logits * logit_scale
    return CohereForCausalLM(CohereConfig(**SMALL, logit_scale=0.25))


def _phi_bias() -> nn.Module:  # an output embedding with a bias
    return PhiForCausalLM(PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=64))


FAMILIES = {
    "llama": _llama, "qwen2-tied": _qwen2_tied, "gemma2-softcap": _gemma2_softcap, "mistral": _mistral,
    "gpt2": _gpt2, "granite-scaled": _granite_scaled, "cohere-scaled": _cohere_scaled, "phi-bias": _phi_bias,
}
TRAINED = ["llama", "qwen2-tied", "gemma2-softcap", "mistral", "gpt2"]  # the five, also trained


def _pair(family: str) -> tuple[nn.Module, nn.Module]:
    """The stock model and a patched copy with the same weights."""
    stock = FAMILIES[family]().float()
    if hasattr(stock.config, "_attn_implementation"):
        stock.config._attn_implementation = "eager"
    ours = use_linear_cross_entropy(copy.deepcopy(stock))
    return stock, ours


def _batch(batch: int = 2, seq: int = SEQ) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, seq))
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt that does not count
    attention = torch.ones_like(ids)
    attention[1, -2:] = 0  # right padding, ignored in the labels too
    labels[1, -2:] = -100
    return dict(input_ids=ids, attention_mask=attention, labels=labels)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(ours: nn.Module, stock: nn.Module) -> None:
    theirs = _grads(stock)
    mine = _grads(ours)
    assert mine.keys() == theirs.keys() and theirs
    for name, grad in theirs.items():
        torch.testing.assert_close(mine[name], grad, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_first_loss_and_every_gradient_equal_the_models_own(family):
    stock, ours = _pair(family)
    batch = _batch()
    torch.manual_seed(1)  # the same dropout masks (GPT-2 trains with dropout 0.1)
    expected = stock(**batch)
    torch.manual_seed(1)
    got = ours(**batch)
    assert got.logits is None and "logits" not in got.keys()
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-6, rtol=1e-5)
    (2.5 * expected.loss).backward()  # grad_output != 1
    (2.5 * got.loss).backward()
    _assert_same_grads(ours, stock)


@pytest.mark.parametrize("family", TRAINED)
def test_adamw_follows_the_same_trajectory(family):
    stock, ours = _pair(family)
    losses = {}
    for name, model in (("stock", stock), ("ours", ours)):
        torch.manual_seed(1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[name] = []
        for _ in range(5):
            loss = model(**_batch()).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.detach())
    torch.testing.assert_close(torch.stack(losses["ours"]), torch.stack(losses["stock"]), atol=1e-5, rtol=1e-5)
    # Adam divides each gradient by its running RMS: where a gradient is ~0, float32 rounding
    # (a different summation order, ~1e-9) moves that weight by a sizeable part of a step.
    # Allowed: 1% of one step (lr 1e-2); a wrong loss or gradient moves weights by whole steps.
    for (name, p), q in zip(ours.named_parameters(), stock.parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 8):
        g = torch.Generator().manual_seed(2)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        # Uneven label counts per row: num_items_in_batch differs from a per-micro-batch mean.
        self.labels = self.ids.clone()
        for i in range(n):
            self.labels[i, : i % 5] = -100

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return dict(input_ids=self.ids[i], labels=self.labels[i])


class _Losses(transformers.TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


@pytest.mark.parametrize("family", TRAINED)
def test_trainer_with_gradient_accumulation_logs_the_same_losses(family, tmp_path):
    stock, ours = _pair(family)
    logged = {}
    for name, model in (("stock", stock), ("ours", ours)):
        args = TrainingArguments(
            output_dir=str(tmp_path / name), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_steps=2, learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
            seed=3, data_seed=3, disable_tqdm=True,
        )
        callback = _Losses()
        trainer = Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=[callback])
        assert trainer.model_accepts_loss_kwargs  # the patched forward still shows **kwargs
        trainer.train()
        logged[name] = callback.losses
    assert len(logged["ours"]) == 2
    assert logged["ours"] == pytest.approx(logged["stock"], rel=1e-5, abs=1e-6)


def test_num_items_in_batch_shift_labels_and_logits_to_keep():
    stock, ours = _pair("llama")
    batch = _batch()
    n = torch.tensor(37)  # the Trainer's count over the accumulated micro-batches
    torch.testing.assert_close(ours(**batch, num_items_in_batch=n).loss, stock(**batch, num_items_in_batch=n).loss)
    labels = batch.pop("labels")
    shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    shift[0, 5] = -100
    torch.testing.assert_close(ours(**batch, labels=labels, shift_labels=shift).loss,
                               stock(**batch, labels=labels, shift_labels=shift).loss)
    # logits_to_keep=k keeps the last k positions; the labels then cover those positions.
    k = 4
    tail = shift[:, -k:].contiguous()
    torch.testing.assert_close(ours(**batch, labels=labels, shift_labels=tail, logits_to_keep=k).loss,
                               stock(**batch, labels=labels, shift_labels=tail, logits_to_keep=k).loss)


def test_without_labels_the_model_and_generation_are_unchanged():
    stock, ours = _pair("gemma2-softcap")
    ids = torch.randint(0, VOCAB, (2, SEQ))
    torch.testing.assert_close(ours(ids).logits, stock(ids).logits)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kwargs), stock.generate(ids, **kwargs))


def test_tuple_output_drops_the_logits():
    stock, ours = _pair("llama")
    batch = _batch()
    expected = stock(**batch, return_dict=False)
    got = ours(**batch, return_dict=False)
    assert len(got) == len(expected) - 1  # as transformers leaves out a None field
    torch.testing.assert_close(got[0], expected[0])


def test_restore_and_the_context_manager_give_back_the_models_own_forward():
    model = _llama()
    batch = _batch()
    stock_loss = model(**batch).loss
    with using_linear_cross_entropy(model, chunk_size=5) as patched:
        assert patched is model and model(**batch).logits is None
        torch.testing.assert_close(model(**batch).loss, stock_loss)
    assert "forward" not in model.__dict__ and "forward" not in model.lm_head.__dict__
    assert model(**batch).logits.shape == (2, SEQ, VOCAB)
    use_linear_cross_entropy(model)
    use_linear_cross_entropy(model, chunk_size=3)  # again: replaces the options, wraps once
    assert model(**batch).logits is None
    assert restore(model) is model and model(**batch).logits is not None
    assert restore(model) is model  # not patched: unchanged


def test_z_loss_option_adds_the_squared_log_partition():
    stock, ours = _pair("llama")
    restore(ours)
    use_linear_cross_entropy(ours, lse_square_scale=1e-2)
    batch = _batch()
    logits = stock(**batch).logits.float()
    shift = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100).reshape(-1)
    flat = logits.reshape(-1, VOCAB)
    counted = shift != -100
    # written-out: CE + scale * logsumexp^2, averaged over counted tokens
    per_token = torch.nn.functional.cross_entropy(flat, shift, reduction="none") + 1e-2 * flat.logsumexp(-1) ** 2
    torch.testing.assert_close(ours(**batch).loss, per_token[counted].mean())


def test_half_precision_loss_is_float32_and_close_to_the_models_own():
    stock, ours = _pair("qwen2-tied")
    stock, ours = stock.bfloat16(), ours.bfloat16()
    batch = _batch()
    expected, got = stock(**batch).loss, ours(**batch).loss
    assert got.dtype == expected.dtype == torch.float32
    # transformers rounds the logits to bfloat16 before its float32 loss; losskit does not
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=1e-2)
    got.backward()
    assert ours.lm_head.weight.grad.dtype == torch.bfloat16


class _LogSoftmaxHead(nn.Module):
    """A causal-LM layout whose loss goes through log_softmax + nll: not foldable."""

    def __init__(self):
        super().__init__()
        self.body = nn.Embedding(VOCAB, 16)
        self.lm_head = nn.Linear(16, VOCAB)

    @property
    def base_model(self) -> nn.Module:
        return self.body

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids, labels=None):
        logits = self.lm_head(self.body(input_ids))
        loss = None
        if labels is not None:
            loss = torch.nn.functional.nll_loss(torch.log_softmax(logits, -1).flatten(0, 1), labels.flatten())
        return loss, logits


class _InlineLoss(_LogSoftmaxHead):
    """The older layout: the model scales, soft-caps and shifts its logits itself and calls
    CrossEntropyLoss (with label smoothing) inline."""

    def forward(self, input_ids, labels=None):
        logits = self.lm_head(self.body(input_ids))
        logits = 2.0 * torch.tanh(logits / 0.5) * 0.75  # a cap of 0.5, then a scale of 3
        loss = None
        if labels is not None:
            shifted = logits[..., :-1, :].contiguous()
            loss = nn.CrossEntropyLoss(label_smoothing=0.1)(shifted.view(-1, VOCAB), labels[..., 1:].reshape(-1))
        return loss, logits.float()


def test_scalings_soft_cap_shift_and_inline_cross_entropy_fold_into_the_models_own_loss():
    stock = _InlineLoss()
    ours = use_linear_cross_entropy(copy.deepcopy(stock))
    ids = torch.randint(0, VOCAB, (3, 7))
    expected, got = stock(ids, labels=ids), ours(ids, labels=ids)
    assert len(got) == 1  # the deferred logits left out, as a None field would be
    torch.testing.assert_close(got[0], expected[0])
    got[0].backward()
    expected[0].backward()
    _assert_same_grads(ours, stock)


def test_a_model_it_cannot_serve_gets_an_error_naming_its_class():
    with pytest.raises(TypeError, match="LlamaForSequenceClassification has no output embedding"):
        use_linear_cross_entropy(LlamaForSequenceClassification(LlamaConfig(**SMALL, pad_token_id=0)))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        use_linear_cross_entropy("gpt2")
    model = use_linear_cross_entropy(_LogSoftmaxHead())
    ids = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(TypeError, match=r"_LogSoftmaxHead applies torch.log_softmax to its logits.*restore\(model\)"):
        model(ids, labels=ids)
    assert model(ids)[1].shape == (2, 5, VOCAB)  # without labels it still runs
    with pytest.raises(ValueError, match="chunk_size must be a positive number"):
        use_linear_cross_entropy(_llama(), chunk_size=0)


def test_import_losskit_does_not_import_transformers():
    code = "import sys, losskit, losskit.functional, losskit.nn; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bench_hf_records_both_runs_with_the_same_losses(tmp_path, monkeypatch, capsys):
    import csv

    from losskit.cli import bench_hf
    from losskit.cli.main import main

    # In-process instead of one subprocess per variant (the peak memory is then not each
    # run's own, which only the real bench needs): the plumbing and the numbers are the same.
    monkeypatch.setattr(bench_hf, "_run_variant", lambda setup, variant, timeout: bench_hf.finetune(setup, variant))
    assert main(["bench", "hf", "--quick", "--out", str(tmp_path)]) == 0
    with (tmp_path / "hf-quick.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["provider"] for r in rows} == {"transformers", "losskit"}
    losses = {(r["provider"], r["mode"]): float(r["p50"]) for r in rows if r["metric"] == "loss"}
    for mode in ("first step", "step 4"):
        assert losses["losskit", mode] == pytest.approx(losses["transformers", mode], rel=1e-5)
    assert "peak extra memory: transformers" in capsys.readouterr().out


# -- token_log_probs: needs losskit.functional.linear_log_probs(_and_entropy) and dpo_loss ---


@pytest.mark.parametrize("family", ["llama", "cohere-scaled", "phi-bias"])
def test_token_log_probs_and_entropy_equal_the_models_logits(family):
    from losskit.integrations.transformers import token_log_probs

    stock, ours = _pair(family)
    restore(ours)  # works on an unpatched model, and leaves it so
    stock.eval(), ours.eval()
    batch = _batch()
    labels = batch.pop("labels")
    logits = stock(**batch).logits.float()
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    # written-out: log_softmax, gathered at the next label, 0 where ignored; entropy -sum p log p
    log_softmax = logits.log_softmax(-1)
    expected = log_softmax.gather(-1, shift.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(shift == -100, 0)
    expected_entropy = -(log_softmax.exp() * log_softmax).sum(-1).masked_fill(shift == -100, 0)
    got = token_log_probs(ours, batch["input_ids"], labels, attention_mask=batch["attention_mask"], entropy=True)
    assert "forward" not in ours.__dict__
    torch.testing.assert_close(got.log_probs, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.entropy, expected_entropy, atol=1e-5, rtol=1e-5)
    expected.sum().backward()
    got.log_probs.sum().backward()
    _assert_same_grads(ours, stock)
    assert token_log_probs(ours, batch["input_ids"], labels).entropy is None


def test_token_log_probs_feed_dpo_loss_as_trls_formula():
    from losskit.functional import dpo_loss
    from losskit.integrations.transformers import token_log_probs

    policy, reference = _llama().eval(), _llama().eval()
    prompt = torch.randint(0, VOCAB, (3, 5))
    chosen, rejected = (torch.cat([prompt, torch.randint(0, VOCAB, (3, 7))], 1) for _ in range(2))
    completion = torch.zeros_like(chosen, dtype=torch.bool)
    completion[:, 5:] = True

    def sequence_log_probs(model, ids):
        return token_log_probs(model, ids, ids.masked_fill(~completion, -100)).log_probs.sum(-1)

    def from_logits(model, ids):  # written-out, as TRL's DPO computes it from full logits
        logp = model(ids).logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (logp * completion[:, 1:]).sum(-1)

    with torch.no_grad():
        ref = [sequence_log_probs(reference, ids) for ids in (chosen, rejected)]
        ref_oracle = [from_logits(reference, ids) for ids in (chosen, rejected)]
    policy_lp = [sequence_log_probs(policy, ids) for ids in (chosen, rejected)]
    oracle_lp = [from_logits(policy, ids) for ids in (chosen, rejected)]
    for got, want in zip(policy_lp + ref, oracle_lp + ref_oracle):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    beta = 0.1
    margin = (oracle_lp[0] - ref_oracle[0]) - (oracle_lp[1] - ref_oracle[1])
    torch.testing.assert_close(dpo_loss(*policy_lp, *ref, beta=beta),
                               -torch.nn.functional.logsigmoid(beta * margin).mean(), atol=1e-6, rtol=1e-5)


def test_token_log_probs_refuses_a_soft_capped_model():
    from losskit.integrations.transformers import token_log_probs

    _, ours = _pair("gemma2-softcap")
    ids = torch.randint(0, VOCAB, (2, SEQ))
    with pytest.raises(TypeError, match="Gemma2ForCausalLM soft-caps its logits"):
        token_log_probs(ours, ids)
