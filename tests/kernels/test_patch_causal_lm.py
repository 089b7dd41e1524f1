"""patch_causal_lm: a Hugging Face causal LM computes the BS-T loss from its final hidden states, logits=None.

Small randomly initialised models from configs (no download). The reference for every check is the unpatched model's
logits fed to bs_token_loss(impl="reference"): same loss, same gradient for every parameter.
"""

from __future__ import annotations

import pytest
import torch

import bs_kernels
from bs_kernels.hf import patch_causal_lm

transformers = pytest.importorskip("transformers")

VOCAB = 211  # odd, and not a multiple of anything a kernel might assume


def llama(tie_word_embeddings: bool = True):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
    )
    return transformers.LlamaForCausalLM(config).eval()


def qwen2():
    config = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return transformers.Qwen2ForCausalLM(config).eval()


def gpt2():
    """Another layout: the decoder is ``transformer`` (not ``model``), positional order differs, tied lm_head."""
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


MODELS = {"llama_tied": llama, "llama_untied": lambda: llama(False), "qwen2": qwen2, "gpt2": gpt2}


def batch(seed: int = 0):
    """input_ids, attention_mask (second sequence left-padded) and labels with a prompt and padding ignored."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (2, 11), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    labels = input_ids.clone()
    labels[:, :4] = -100
    labels[attention_mask == 0] = -100
    return input_ids, attention_mask, labels


def parameter_grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def reference_loss_and_grads(model, input_ids, attention_mask, labels, **options):
    model.zero_grad()
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    loss = bs_kernels.bs_token_loss(logits, labels, impl="reference", **options)
    loss.backward()
    return loss.detach(), parameter_grads(model)


def assert_same_grads(grads, ref_grads):
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-5, rtol=2e-5, msg=name)


@pytest.mark.parametrize("architecture", list(MODELS))
def test_patched_loss_and_gradients_match(impl, architecture):
    torch.manual_seed(0)
    model = MODELS[architecture]()
    input_ids, attention_mask, labels = batch()
    options = dict(lam=0.3, top_k=7)
    ref_loss, ref_grads = reference_loss_and_grads(model, input_ids, attention_mask, labels, **options)

    model.zero_grad()
    with patch_causal_lm(model):
        output = model(input_ids, attention_mask=attention_mask, labels=labels, bs_loss=dict(impl=impl, **options))
        assert output.logits is None
        output.loss.backward()
    torch.testing.assert_close(output.loss.detach(), ref_loss, atol=2e-6, rtol=2e-6)
    assert_same_grads(parameter_grads(model), ref_grads)
    assert "forward" not in model.__dict__  # the context manager restored the class's forward


def test_lora_adapter(impl):
    """Through a PEFT wrapper: the frozen lm_head gets no gradient, the LoRA weights get the reference gradient."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = llama(tie_word_embeddings=False)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter for the forward too
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    input_ids, attention_mask, labels = batch(1)
    ref_loss, ref_grads = reference_loss_and_grads(model, input_ids, attention_mask, labels)
    assert ref_grads and all("lora_" in name for name in ref_grads)

    model.zero_grad()
    handle = patch_causal_lm(model)
    output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, bs_loss=dict(impl=impl))
    output.loss.backward()
    handle.remove()
    assert output.logits is None
    torch.testing.assert_close(output.loss.detach(), ref_loss, atol=2e-6, rtol=2e-6)
    assert_same_grads(parameter_grads(model), ref_grads)


def test_lora_on_lm_head_is_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(llama(False), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(TypeError, match="not an nn.Linear"):
        patch_causal_lm(model)


def test_ddp_wrapper(tmp_path):
    """Called through DistributedDataParallel (one CPU process, gloo): the loss runs inside the wrapped forward."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = llama(False)
        input_ids, attention_mask, labels = batch(2)
        ref_loss, ref_grads = reference_loss_and_grads(model, input_ids, attention_mask, labels)
        model.zero_grad()
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        patch_causal_lm(wrapped)
        output = wrapped(input_ids=input_ids, attention_mask=attention_mask, labels=labels, bs_loss=True)
        output.loss.backward()
        torch.testing.assert_close(output.loss.detach(), ref_loss, atol=2e-6, rtol=2e-6)
        assert_same_grads(parameter_grads(model), ref_grads)
    finally:
        dist.destroy_process_group()


class ForwardingWrapper(torch.nn.Module):
    """Shaped like DeepSpeed's engine and FSDP: ``.module``, and unknown attributes forwarded to it."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.calls = 0

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


def test_forwarding_wrapper_patches_the_inner_model():
    model = llama()
    wrapper = ForwardingWrapper(model)
    handle = patch_causal_lm(wrapper)
    assert handle.causal_lm is model and "forward" not in wrapper.__dict__
    input_ids, attention_mask, labels = batch()
    output = wrapper(input_ids, attention_mask=attention_mask, labels=labels, bs_loss=True)
    assert wrapper.calls == 1 and output.logits is None
    expected = bs_kernels.bs_token_loss(model(input_ids, attention_mask=attention_mask).logits, labels)
    torch.testing.assert_close(output.loss, expected, atol=2e-6, rtol=2e-6)


def test_unpatched_calls_and_stats():
    torch.manual_seed(0)
    model = llama()
    input_ids, attention_mask, labels = batch()
    expected = model(input_ids, attention_mask=attention_mask, labels=labels)
    handle = patch_causal_lm(model)
    assert patch_causal_lm(model).causal_lm is handle.causal_lm  # patching twice wraps once
    plain = model(input_ids, attention_mask=attention_mask, labels=labels)  # no bs_loss: the stock forward
    torch.testing.assert_close(plain.logits, expected.logits, atol=0, rtol=0)
    torch.testing.assert_close(plain.loss, expected.loss, atol=0, rtol=0)

    logits = expected.logits.detach()
    output = model(input_ids, labels=labels, attention_mask=attention_mask, bs_loss=dict(return_stats=True, top_k=3))
    ref_loss, ref_stats = bs_kernels.bs_token_loss(logits, labels, top_k=3, impl="reference", return_stats=True)
    torch.testing.assert_close(output.loss.detach(), ref_loss, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(output.bs_stats.token_logprobs, ref_stats.token_logprobs, atol=2e-5, rtol=2e-5)

    # Per-token log p(label) (GA / NPO): lam = 0 with reduction "none".
    per_token = model(input_ids, attention_mask=attention_mask, labels=labels, bs_loss=dict(lam=0.0, reduction="none"))
    expected_logprobs = bs_kernels.forget_logprobs(logits, labels, impl="reference")
    torch.testing.assert_close(per_token.loss.detach(), expected_logprobs, atol=2e-5, rtol=2e-5)

    as_tuple = model(input_ids, attention_mask=attention_mask, labels=labels, bs_loss=True, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], bs_kernels.bs_token_loss(logits, labels, impl="reference"))
    handle.remove()
    assert "forward" not in model.__dict__


def test_errors():
    model = llama()
    patch_causal_lm(model)
    input_ids, _, labels = batch()
    with pytest.raises(ValueError, match="labels"):
        model(input_ids, bs_loss=True)
    with pytest.raises(TypeError, match="unknown options"):
        model(input_ids, labels=labels, bs_loss=dict(lamda=0.1))
    with pytest.raises(TypeError, match="bs_loss must be"):
        model(input_ids, labels=labels, bs_loss="yes")

    opt = transformers.OPTForCausalLM(
        transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
            max_position_embeddings=32,
        )
    )
    with pytest.raises(ValueError, match="model_type='opt'"):
        patch_causal_lm(opt)
    with pytest.raises(TypeError, match="Hugging Face causal LM"):
        patch_causal_lm(torch.nn.Linear(3, 3))


def _zero_parameters(model) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()


def test_deep_copy_of_a_patched_model_runs_the_copy():
    """The driver deep-copies a patched model for NPO's / KL's reference: the copy must run its own weights, with
    and without bs_loss, and the original must stay patched and unchanged (issue 26, item 1)."""
    torch.manual_seed(0)
    model = llama()
    input_ids, attention_mask, labels = batch()
    patch_causal_lm(model)
    before = model(input_ids, attention_mask=attention_mask).logits
    fused_before = model(input_ids, attention_mask=attention_mask, labels=labels, bs_loss=True).loss
    import copy

    clone = copy.deepcopy(model)
    _zero_parameters(clone)
    # All-zero weights give all-zero logits; the fused loss is the reference loss on them.
    zeros = torch.zeros(2, 11, VOCAB)
    torch.testing.assert_close(clone(input_ids).logits, zeros, atol=0, rtol=0)
    fused = clone(input_ids, attention_mask=attention_mask, labels=labels, bs_loss=True)
    expected = bs_kernels.bs_token_loss(zeros, labels, impl="reference")
    torch.testing.assert_close(fused.loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(input_ids, attention_mask=attention_mask).logits, before, atol=0, rtol=0)
    again = model(input_ids, attention_mask=attention_mask, labels=labels, bs_loss=True).loss
    torch.testing.assert_close(again, fused_before, atol=0, rtol=0)
    patch_causal_lm(clone).remove()  # the copy's patch is its own: removing it leaves the original patched
    assert "forward" not in clone.__dict__ and "forward" in model.__dict__


def test_patched_model_pickles(tmp_path):
    """torch.save / torch.load of a whole patched model (pickle): the loaded model is patched and runs its weights."""
    torch.manual_seed(0)
    model = llama()
    input_ids, attention_mask, labels = batch()
    patch_causal_lm(model)
    expected = model(input_ids, attention_mask=attention_mask, labels=labels, bs_loss=True).loss
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    torch.testing.assert_close(
        loaded(input_ids, attention_mask=attention_mask, labels=labels, bs_loss=True).loss, expected, atol=0, rtol=0
    )
    _zero_parameters(loaded)
    assert loaded(input_ids).logits.abs().max() == 0


def test_patch_keeps_the_forward_signature_and_an_instance_forward():
    """The Trainer reads the forward's signature to keep dataset columns; an instance-level forward installed before
    the patch (another library's wrapper) is what the patch calls, and what remove() puts back."""
    import functools
    import inspect

    model = llama()
    stock = inspect.signature(model.forward)
    calls = []
    inner = model.forward

    @functools.wraps(inner)
    def wrapped(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    model.forward = wrapped
    handle = patch_causal_lm(model)
    assert inspect.signature(model.forward) == stock
    input_ids, _, labels = batch()
    model(input_ids)
    assert calls == [1]
    handle.remove()
    assert model.__dict__["forward"] is wrapped
