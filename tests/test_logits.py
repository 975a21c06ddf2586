"""The logits the engine samples from are the ones the base model defines:
models whose forward scales (Cohere, Granite) or soft-caps (Gemma-2) lm_head's
output get the same, and a model whose forward does something else is refused."""

import pytest
import torch
from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig, LlamaForCausalLM

from eagle_gto.target import TargetRunner

SIZES = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, pad_token_id=None, bos_token_id=None, eos_token_id=None)
CONFIGS = {
    "cohere": CohereConfig(**SIZES, logit_scale=0.0625),
    "granite": GraniteConfig(**SIZES, logits_scaling=8.0),
    "gemma2": Gemma2Config(**SIZES, head_dim=16, final_logit_softcapping=5.0, attn_implementation="eager"),
    "llama": LlamaConfig(**SIZES),
}


@pytest.mark.parametrize("arch", CONFIGS)
def test_engine_logits_equal_the_models_own(arch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]).eval()
    runner = TargetRunner(model, None)
    ids = torch.randint(0, 96, (9,))
    logits, _ = runner.forward(ids, torch.arange(9), torch.ones(9, 9, dtype=torch.bool).tril(), runner.new_cache(9))
    with torch.no_grad():
        expected = model(input_ids=ids[None]).logits[0]
        raw = model.get_output_embeddings()(model.get_decoder()(input_ids=ids[None]).last_hidden_state[0])
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert (arch == "llama") == torch.allclose(raw, expected)  # the others post-process lm_head's output


class ScaledLlama(LlamaForCausalLM):
    """Post-processes its logits in a way no config describes."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3
        return out


def test_a_model_with_unknown_logit_processing_is_refused():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="ScaledLlama: its forward computes logits other than lm_head"):
        TargetRunner(ScaledLlama(CONFIGS["llama"]).eval(), None)


@pytest.mark.parametrize("arch", ["cohere", "gemma2"])
def test_gto_rewards_read_the_models_own_logits(arch):
    """GTO's target pass (its rewards and L_token's targets) uses the same logits as decoding."""
    from eagle_gto.gto.trees import target_pass

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]).eval()
    tokens = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        found = target_pass(model, tokens, None).logits
        expected = model(input_ids=tokens).logits
    torch.testing.assert_close(found, expected.float(), rtol=1e-5, atol=1e-5)


def test_the_check_is_not_fooled_by_dropout_and_leaves_the_mode_as_it_was():
    torch.manual_seed(0)
    config = LlamaConfig(**{**SIZES, "attention_dropout": 0.5})
    model = AutoModelForCausalLM.from_config(config).train()
    TargetRunner(model, None)
    assert model.training
