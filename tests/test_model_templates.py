"""Chat templates: the exact strings of Sa2VA's PROMPT_TEMPLATE entries, read from a published config.json.

The reference prompt is written as Sa2VA's predict_forward / training builds it: ``INSTRUCTION.format(input=
"<img>" + N x "<IMG_CONTEXT>" + "</img>\\n" + question)``, tokenised in one go with the tokenizer's default
special tokens (its BOS, when it adds one); the answer is ``answer + SUFFIX``.
"""

import json

import pytest
import torch
from conftest import WORDS

from maskloop.config import ConfigError
from maskloop.model import prompts as P
from maskloop.model.sequence import assemble

# follows magic-research/Sa2VA projects/llava_sam2/hf/models/templates.py L18-L25 (internlm2_chat), L51-L58 (qwen_chat),
# L163-L169 (phi3_chat) (commit d01bf3f)
# the strings as published in Sa2VA's templates.py (written out here, independent of the table)
SA2VA = {
    "phi3_chat": ("<|user|>\n{input}<|end|>\n<|assistant|>\n", "<|end|>", ["<|end|>"]),
    "qwen_chat": ("<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>",
                  ["<|im_end|>", "<|endoftext|>"]),
    "internlm2_chat": ("<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>", ["<|im_end|>"]),
}
SYSTEM = {
    "phi3_chat": "<|system|>\n{system}<|end|>\n",
    "qwen_chat": "<|im_start|>system\n{system}<|im_end|>\n",
    "internlm2_chat": "<|im_start|>system\n{system}<|im_end|>\n",
}


def _tokenizer(bos: bool):
    tok = P.build_word_tokenizer(WORDS)
    if bos:  # an InternLM2-like tokenizer: encode() puts <s> first
        from tokenizers.processors import TemplateProcessing

        tok.add_special_tokens({"bos_token": "<s>"})
        bid = tok.convert_tokens_to_ids("<s>")
        tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bid)])
    return tok


def _row(parts, pad):
    a = assemble(parts, 1, pad, torch.device("cpu"))
    return a.input_ids[0][a.attention_mask[0].bool()].tolist()


# follows magic-research/Sa2VA projects/llava_sam2/hf/models/templates.py L18-L25, L51-L58, L163-L169 (commit d01bf3f)
@pytest.mark.parametrize("name", sorted(SA2VA))
@pytest.mark.parametrize("bos", [False, True])
def test_template_strings_prompt_ids_and_stop_words(name, bos):
    instruction, suffix, stops = SA2VA[name]
    t = P.get_template(name)
    assert (t.instruction, t.suffix, list(t.stop_words), t.system) == (instruction, suffix, stops, SYSTEM[name])
    tok = _tokenizer(bos)
    P.add_special_tokens(tok)
    n = 4
    b = P.PromptBuilder(tok, n, name)
    img = "<img>" + "<IMG_CONTEXT>" * n + "</img>\n"
    # referring segmentation, the fixed paraphrase
    q = P.SEG_QUESTIONS[0].format(expr="red circle")
    want = tok.encode(instruction.format(input=img + q), add_special_tokens=True)
    want_answer = tok.encode("Sure, [SEG]." + suffix, add_special_tokens=False)
    parts = b.seg_parts(b.expressions(["red circle"]), b.seg_question(1, fixed=True))
    assert _row(parts, b.pad_id) == want + want_answer
    assert (want[0] == tok.convert_tokens_to_ids("<s>")) == bos
    # region caption, K = 3 region tokens
    region = "<vp>" + "<IMG_CONTEXT>" * 3 + "</vp>"
    want = tok.encode(instruction.format(input=img + P.REGION_CAPTION_QUESTION.format(region=region)),
                      add_special_tokens=True)
    cap = b.caption_answer(["a small red circle"])
    assert _row(b.caption_parts(torch.tensor([3]), cap), b.pad_id) == want + tok.encode(
        "a small red circle" + suffix, add_special_tokens=False)
    # stop words: every one ends generation
    assert b.stop_seqs == [tok.encode(w, add_special_tokens=False) for w in stops]
    assert b.end_id == tok.convert_tokens_to_ids(suffix)


# stop words follow magic-research/Sa2VA projects/llava_sam2/hf/models/templates.py L58 (qwen_chat) (commit d01bf3f)
def test_generation_stops_at_every_stop_word_multi_token_included(tiny_tokenizer):
    """qwen_chat stops at <|im_end|> or <|endoftext|>; a stop word the tokenizer splits is matched whole."""
    from conftest import make_tiny

    model = make_tiny(seed=2, template="qwen_chat")
    b = model.builder
    endoftext = tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    red = tiny_tokenizer.convert_tokens_to_ids("red")
    blue = tiny_tokenizer.convert_tokens_to_ids("blue")
    for stop_seqs, script, want_len in (
        (b.stop_seqs, [red, endoftext, blue, blue], 1),
        (b.stop_seqs + [[red, blue]], [blue, red, blue, red], 1),  # a two-token stop word
    ):
        model.builder.stop_seqs = stop_seqs
        # force the greedy picks through the lm_head: one-hot logits from a scripted sequence
        steps = iter(script)
        model.lm_logits = lambda h, steps=steps: torch.nn.functional.one_hot(
            torch.full(h.shape[:-1], next(steps)), model.internvl.lm_head.weight.shape[0]).float()
        emb = torch.zeros(1, 3, model.cfg.llm.hidden_size)
        out = model.generate(emb, torch.ones(1, 3, dtype=torch.long), torch.arange(3)[None], 4, static=False)
        assert bool(out.finished[0]) and int(out.lengths[0]) == want_len


def test_unknown_template_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown chat template 'vicuna'.*internlm2_chat.*phi3_chat.*qwen_chat"):
        P.get_template("vicuna")
    assert P.template_name("phi3-chat") == "phi3_chat" and P.template_name("phi3") == "phi3_chat"
    from maskloop.model.checkpoints import config_from_folder

    (tmp_path / "config.json").write_text(json.dumps({**_published_config("Qwen2ForCausalLM"), "template": "vicuna"}))
    with pytest.raises(ConfigError, match="vicuna"):
        config_from_folder(tmp_path)


def _published_config(arch, template="qwen_chat"):
    return {
        "architectures": ["Sa2VAChatModel"],
        "template": template,
        "downsample_ratio": 0.5,
        "ps_version": "v2",
        "select_layer": -1,
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12,
        "vision_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "intermediate_size": 64, "image_size": 64, "patch_size": 4, "qkv_bias": True},
        "llm_config": {"architectures": [arch], "vocab_size": 600, "hidden_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128},
    }


@pytest.mark.parametrize("template", ["phi3_chat", "qwen_chat", "internlm2_chat"])
def test_template_is_read_from_config_json(tmp_path, template):
    from maskloop.model.checkpoints import config_from_folder

    (tmp_path / "config.json").write_text(json.dumps(_published_config("Qwen2ForCausalLM", template)))
    assert config_from_folder(tmp_path).template == template
