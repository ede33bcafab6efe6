"""Tiny random Hugging Face models, built from configs (no download), with matching input batches.

Each family builder returns a `Tiny` with the model in float32 eval-free state and a `batch(B, ...)`
that makes model inputs with one image per sample: text tokens, the image's placeholder run (its
length read from the model's own `get_image_features`), more text. Positions of image tokens are
returned so tests can put vision labels there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers as tf

# The vocabulary is large against every other size (hidden 32, heads x T, V x D) so that a tensor of
# B x T x V / 2 elements stands out in the allocation test: ids >= 1000 are special, 3..999 text.
V = 1024
IMG = 1000  # image placeholder id in every family
TEXT_IDS = (3, 1000)
SPECIAL = {"boi": 1001, "eoi": 1002, "vstart": 1003, "vend": 1004, "video": 1005}


def _llama(**kw):
    d = {
        "model_type": "llama",
        "vocab_size": V,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    d.update(kw)
    return d


def _qwen2(**kw):
    return _llama(model_type="qwen2", **kw)


def _clip(**kw):
    d = {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 16,
        "patch_size": 4,
        "projection_dim": 32,
    }
    d.update(kw)
    return d


def _siglip(**kw):
    d = {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 16,
        "patch_size": 4,
    }
    d.update(kw)
    return d


@dataclass
class Tiny:
    family: str
    model: torch.nn.Module
    make_pixels: Callable[[int], dict]  # B -> pixel inputs (one image per sample)
    extra: Callable[[torch.Tensor], dict] | None = None  # input_ids -> extra keys (token type ids)
    image_token_id: int = IMG
    multimodal: bool = True

    def tokens_per_image(self, pix: dict) -> list[int]:
        m = self.model
        core = getattr(m, "model", m)
        args = {k: v for k, v in pix.items() if k not in ("image_sizes_for_count",)}
        with torch.no_grad():
            if self.family in ("idefics3", "smolvlm"):
                feats = core.get_image_features(args["pixel_values"], args.get("pixel_attention_mask"))
            elif self.family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
                feats = core.get_image_features(args["pixel_values"], args["image_grid_thw"])
            elif "image_sizes" in args:
                feats = core.get_image_features(args["pixel_values"], image_sizes=args["image_sizes"])
            else:
                feats = core.get_image_features(args["pixel_values"])
        po = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        if isinstance(po, torch.Tensor):
            if po.dim() == 3:
                return [po.shape[1]] * po.shape[0]
            return [po.shape[0]]
        return [x.shape[0] for x in po]

    def batch(self, B: int = 2, pre: int = 12, post: int = 24, seed: int = 0) -> dict:
        """input_ids = [bos, pre text, image run, post text]; with Idefics-style families the image run
        is several views, each its own run (the counts are summed: one run per image here)."""
        g = torch.Generator().manual_seed(seed)
        out: dict = {}
        if self.multimodal:
            pix = self.make_pixels(B)
            counts = self.tokens_per_image(pix)
            if len(counts) != B:  # several views per image: merge consecutive views
                per = len(counts) // B
                counts = [sum(counts[i * per : (i + 1) * per]) for i in range(B)]
            out.update(pix)
        else:
            counts = [0] * B
        rows = []
        for b in range(B):
            ids = [1] + torch.randint(*TEXT_IDS, (pre,), generator=g).tolist()
            ids += [self.image_token_id] * counts[b]
            ids += torch.randint(*TEXT_IDS, (post,), generator=g).tolist()
            rows.append(ids)
        T = max(len(r) for r in rows)
        input_ids = torch.zeros(B, T, dtype=torch.long)
        attn = torch.zeros(B, T, dtype=torch.long)
        for b, r in enumerate(rows):  # left padding keeps every row's last position real
            input_ids[b, T - len(r) :] = torch.tensor(r)
            attn[b, T - len(r) :] = 1
        out["input_ids"] = input_ids
        out["attention_mask"] = attn
        if self.extra is not None:
            out.update(self.extra(input_ids))
        return out


def _mm_type(ids):
    return {"mm_token_type_ids": (ids == IMG).int()}


def _tok_type(ids):
    return {"token_type_ids": (ids == IMG).long()}


def qwen2_vl(seed=0, cls=tf.Qwen2VLForConditionalGeneration, cfg_cls=tf.Qwen2VLConfig, family="qwen2_vl"):
    torch.manual_seed(seed)
    text = _qwen2(rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0})
    text.pop("model_type")
    vis = {
        "depth": 1,
        "embed_dim": 32,
        "hidden_size": 32,
        "num_heads": 2,
        "patch_size": 4,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "mlp_ratio": 2,
    }
    if family == "qwen2_5_vl":
        vis = {
            "depth": 2,
            "hidden_size": 32,
            "out_hidden_size": 32,
            "intermediate_size": 48,
            "num_heads": 2,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 16,
            "fullatt_block_indexes": [1],
        }
    if family == "qwen3_vl":
        text["head_dim"] = 8
        text["rope_parameters"] = {
            "rope_type": "default",
            "mrope_section": [2, 1, 1],
            "rope_theta": 10000.0,
            "mrope_interleaved": True,
        }
        vis = {
            "depth": 2,
            "hidden_size": 32,
            "out_hidden_size": 32,
            "intermediate_size": 48,
            "num_heads": 2,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0],
        }
    cfg = cfg_cls(
        text_config=text,
        vision_config=vis,
        image_token_id=IMG,
        video_token_id=SPECIAL["video"],
        vision_start_token_id=SPECIAL["vstart"],
        vision_end_token_id=SPECIAL["vend"],
    )
    model = cls(cfg)

    def pixels(B):
        thw = torch.tensor([[1, 4, 6]] * B)
        return {"pixel_values": torch.randn(B * 24, 3 * 2 * 16), "image_grid_thw": thw}

    return Tiny(family, model, pixels, _mm_type)


def qwen2_5_vl(seed=0):
    return qwen2_vl(seed, tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLConfig, "qwen2_5_vl")


def qwen3_vl(seed=0):
    return qwen2_vl(seed, tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLConfig, "qwen3_vl")


def llava(seed=0):
    torch.manual_seed(seed)
    cfg = tf.LlavaConfig(
        vision_config=_clip(),
        text_config=_llama(),
        image_token_index=IMG,
        vision_feature_layer=-1,
        image_seq_length=16,
    )
    model = tf.LlavaForConditionalGeneration(cfg)
    return Tiny("llava", model, lambda B: {"pixel_values": torch.randn(B, 3, 16, 16)})


def llava_next(seed=0):
    torch.manual_seed(seed)
    cfg = tf.LlavaNextConfig(
        vision_config=_clip(),
        text_config=_llama(),
        image_token_index=IMG,
        vision_feature_layer=-1,
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
        image_seq_length=16,
    )
    model = tf.LlavaNextForConditionalGeneration(cfg)

    def pixels(B):  # base view + 2 tiles of a 16 x 32 (h x w) image
        return {"pixel_values": torch.randn(B, 3, 3, 16, 16), "image_sizes": torch.tensor([[16, 30]] * B)}

    return Tiny("llava_next", model, pixels)


def llava_onevision(seed=0):
    torch.manual_seed(seed)
    cfg = tf.LlavaOnevisionConfig(
        vision_config=_siglip(),
        text_config=_qwen2(),
        image_token_index=IMG,
        video_token_index=SPECIAL["video"],
        vision_feature_layer=-1,
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
    )
    model = tf.LlavaOnevisionForConditionalGeneration(cfg)

    def pixels(B):
        return {"pixel_values": torch.randn(B, 3, 3, 16, 16), "image_sizes": torch.tensor([[16, 30]] * B)}

    return Tiny("llava_onevision", model, pixels)


def internvl(seed=0):
    torch.manual_seed(seed)
    vis = {
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": [16, 16],
        "patch_size": [4, 4],
    }
    cfg = tf.InternVLConfig(vision_config=vis, text_config=_qwen2(), image_token_id=IMG, image_seq_length=4)
    model = tf.InternVLForConditionalGeneration(cfg)
    return Tiny("internvl", model, lambda B: {"pixel_values": torch.randn(B, 3, 16, 16)})


def idefics3(seed=0, cls=tf.Idefics3ForConditionalGeneration, cfg_cls=tf.Idefics3Config, family="idefics3"):
    torch.manual_seed(seed)
    vis = {
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 16,
        "patch_size": 4,
    }
    cfg = cfg_cls(vision_config=vis, text_config=_llama(), image_token_id=IMG, scale_factor=2)
    model = cls(cfg)

    def pixels(B):  # two views per image
        return {
            "pixel_values": torch.randn(B, 2, 3, 16, 16),
            "pixel_attention_mask": torch.ones(B, 2, 16, 16, dtype=torch.bool),
        }

    return Tiny(family, model, pixels)


def smolvlm(seed=0):
    return idefics3(seed, tf.SmolVLMForConditionalGeneration, tf.SmolVLMConfig, "smolvlm")


def gemma3(seed=0, final_logit_softcapping=None):
    torch.manual_seed(seed)
    text = {
        "vocab_size": V,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "query_pre_attn_scalar": 8,
        "sliding_window": 8,
        "max_position_embeddings": 512,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "final_logit_softcapping": final_logit_softcapping,
    }
    cfg = tf.Gemma3Config(
        text_config=text,
        vision_config=_siglip(),
        mm_tokens_per_image=4,
        boi_token_index=SPECIAL["boi"],
        eoi_token_index=SPECIAL["eoi"],
        image_token_index=IMG,
    )
    model = tf.Gemma3ForConditionalGeneration(cfg)
    return Tiny("gemma3", model, lambda B: {"pixel_values": torch.randn(B, 3, 16, 16)}, _tok_type)


def mistral3(seed=0):
    torch.manual_seed(seed)
    vis = {
        "model_type": "pixtral",
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 4,
        "head_dim": 16,
    }
    text = {
        "model_type": "mistral",
        "vocab_size": V,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 512,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    cfg = tf.Mistral3Config(vision_config=vis, text_config=text, image_token_index=IMG, spatial_merge_size=2)
    model = tf.Mistral3ForConditionalGeneration(cfg)

    def pixels(B):
        return {"pixel_values": torch.randn(B, 3, 16, 24), "image_sizes": torch.tensor([[16, 24]] * B)}

    return Tiny("mistral3", model, pixels)


def _text(**kw):
    """_llama()'s sizes as keyword arguments of a text model's config class."""
    d = _llama(**kw)
    del d["model_type"]
    return d


def llama_causal(seed=0):
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**_text()))
    return Tiny("llama", model, lambda B: {}, multimodal=False)


def gemma2_causal(seed=0):
    """Text model whose forward applies final logit softcapping after the head."""
    torch.manual_seed(seed)
    cfg = tf.Gemma2Config(**_text(head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
                                  final_logit_softcapping=0.5))
    return Tiny("gemma2", tf.Gemma2ForCausalLM(cfg), lambda B: {}, multimodal=False)


def cohere_causal(seed=0):
    """Text model whose forward multiplies the logits by config.logit_scale."""
    torch.manual_seed(seed)
    cfg = tf.CohereConfig(**_text(logit_scale=0.25))
    return Tiny("cohere", tf.CohereForCausalLM(cfg), lambda B: {}, multimodal=False)


def granite_causal(seed=0):
    """Text model whose forward divides the logits by config.logits_scaling."""
    torch.manual_seed(seed)
    cfg = tf.GraniteConfig(**_text(logits_scaling=4.0))
    return Tiny("granite", tf.GraniteForCausalLM(cfg), lambda B: {}, multimodal=False)


VLM_FAMILIES = {
    "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": qwen2_5_vl,
    "qwen3_vl": qwen3_vl,
    "llava": llava,
    "llava_next": llava_next,
    "llava_onevision": llava_onevision,
    "internvl": internvl,
    "idefics3": idefics3,
    "smolvlm": smolvlm,
    "gemma3": gemma3,
    "mistral3": mistral3,
}
TEXT_FAMILIES = {
    "llama": llama_causal,
    "gemma2": gemma2_causal,
    "cohere": cohere_causal,
    "granite": granite_causal,
}
ALL_FAMILIES = {**VLM_FAMILIES, **TEXT_FAMILIES}


def tiny_tokenizer(vocab_size: int = V):
    """A word-level fast tokenizer over w3..w999 (no download), for trainers that want a processing class."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


# ---- a tiny offline Qwen2-VL processor (word-level tokenizer, local image processor) ---------------------

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen2_vl_processor(words: list[str], *, max_pixels: int = 224 * 112, padding_side: str = "right"):
    """Qwen2VLProcessor over a word-level vocabulary (`words` + chat words), no download. The
    processor class refuses video_processor=None without torchvision (its registry check), so a
    subclass skips exactly that check; all text and image processing is the real class's."""
    import warnings

    from tokenizers import Tokenizer, models, pre_tokenizers

    base = ["[UNK]", "user", "assistant", "system", "Read", "the", "text", ".", "\n"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(base + list(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=QWEN_SPECIALS[1:],
        padding_side=padding_side,
    )

    class _Qwen2VLProcessor(tf.Qwen2VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    _Qwen2VLProcessor.__name__ = "Qwen2VLProcessor"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ip = tf.Qwen2VLImageProcessor(
            min_pixels=56 * 56, max_pixels=max_pixels, patch_size=14, merge_size=2, temporal_patch_size=2
        )
    return _Qwen2VLProcessor(image_processor=ip, tokenizer=fast, chat_template=QWEN_TEMPLATE)


def qwen2_vl_for_processor(processor, seed: int = 0, hidden: int = 32):
    """A tiny Qwen2-VL whose vocabulary, special ids and patching match `processor`."""
    torch.manual_seed(seed)
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = {
        "vocab_size": len(tok),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "rope_parameters": {
            "rope_type": "default",
            "mrope_section": [hidden // 16, hidden // 32, hidden // 32],
            "rope_theta": 10000.0,
        },
        "pad_token_id": ids["<|endoftext|>"],
        "bos_token_id": ids["<|im_start|>"],
        "eos_token_id": ids["<|im_end|>"],
    }
    vis = {
        "depth": 1,
        "embed_dim": hidden,
        "hidden_size": hidden,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "mlp_ratio": 2,
    }
    cfg = tf.Qwen2VLConfig(
        text_config=text,
        vision_config=vis,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return tf.Qwen2VLForConditionalGeneration(cfg)
