"""Tiny random-weight models of the real architectures, built offline in a second: SD3 / SD3.5, FLUX.1-dev,
Qwen-Image, Wan 2.1 text-to-video and FLUX.2-dev diffusers pipelines, and a transformers CLIP model (what the
PickScore and Aesthetic rewards load).

They are for trying tempflow's diffusers code paths on a machine without a GPU, without downloading gigabytes from a
model hub (nothing here touches the network), and for tests. The architectures, configs, tokenizers and folder
layouts are the real ones; the sizes are not (one layer, widths of 8 to 32), so a forward takes milliseconds. The
weights are random: the images they make are noise and their rewards mean nothing.

Write one to a folder with::

    tempflow tiny-model sd3|flux|qwenimage|wan|zimage|flux2|clip FOLDER

and use the folder wherever tempflow takes a local model folder, e.g. ``tempflow sample --model FOLDER --size 16``
(``tempflow.models.load_model(FOLDER, height=.., width=..)``) or ``tempflow.rewards.PickScore(FOLDER)``. The tiny VAE
does not downsample, so latents are as large as the images: SD3 takes images up to 32x32 (a 16-patch position
embedding of 2x2 patches), FLUX any size that is a multiple of 2 (16x16 keeps it fast). The tiny Qwen-Image VAE
halves the image size (the real one divides it by 8), so its images are multiples of 4 (16x16: 16 tokens). The tiny
Wan VAE divides the size by 4 (the real one by 8) and, as the real one, compresses 4 frames into one after the first,
so its videos are multiples of 8 a side with 4k+1 frames (``load_model(FOLDER, height=16, width=16, num_frames=5)``).
The tiny Z-Image VAE halves the image size (the real one divides it by 8), so its images are multiples of 4.
The tiny FLUX.2 VAE halves the image size (the real one divides it by 8), so its images are multiples of 4; its
prompts take 26 tokens of chat template before the prompt (``max_sequence_length=64`` keeps tests fast).

In Python, :func:`sd3_pipeline`, :func:`flux_pipeline`, :func:`qwenimage_pipeline`, :func:`wan_pipeline`,
:func:`zimage_pipeline` and :func:`flux2_pipeline` return the pipelines in memory and :func:`save_tiny` writes a
folder. The same seed gives the same weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import diffusers

__all__ = [
    "KINDS",
    "sd3_pipeline",
    "flux_pipeline",
    "qwenimage_pipeline",
    "wan_pipeline",
    "zimage_pipeline",
    "flux2_pipeline",
    "save_tiny",
]

KINDS = ("sd3", "flux", "qwenimage", "wan", "zimage", "flux2", "clip")

LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("tiny models need transformers: pip install transformers (or tempflow[diffusers])") from exc
    return transformers


def clip_tokenizer(root, model_max_length: int = 77):
    """A CLIP BPE tokenizer of single letters and digits (no merges); its ``vocab.json`` and ``merges.txt`` are
    written under ``root``. Returns ``(tokenizer, vocab_size)``."""
    transformers = _transformers()
    os.makedirs(root, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for tok in LETTERS + [t + "</w>" for t in LETTERS]:
        vocab[tok] = len(vocab)
    vocab_file, merges_file = os.path.join(root, "vocab.json"), os.path.join(root, "merges.txt")
    with open(vocab_file, "w") as fh:
        json.dump(vocab, fh)
    with open(merges_file, "w") as fh:
        fh.write("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(vocab_file, merges_file, model_max_length=model_max_length)
    return tok, len(vocab)


def t5_tokenizer():
    """A T5 tokenizer of single letters and digits and the word start ``▁``. Returns ``(tokenizer, vocab_size)``.

    A Unigram model with T5's own pre-tokenizer and decoder (whitespace split, then ``▁`` before every word), so that
    it saves and reloads the same: transformers 5's ``T5Tokenizer`` keeps only the vocabulary of a saved
    ``tokenizer.json`` and rebuilds that pipeline around it."""
    transformers = _transformers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    space = "\u2581"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (space, -2.0), *[(c, -1.0) for c in LETTERS]]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    metaspace = {"replacement": space, "prepend_scheme": "always", "split": True}
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)]
    )
    tok.decoder = decoders.Metaspace(**metaspace)
    return transformers.T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                        extra_ids=0, model_max_length=512), len(vocab)  # fmt: skip


def clip_encoder(vocab, projection=True, hidden=16, proj=8):
    """A one-layer CLIP text encoder (with its projection, as SD3's two; without, as FLUX's)."""
    transformers = _transformers()
    cfg = transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77, projection_dim=proj,
                                      eos_token_id=1, bos_token_id=0, pad_token_id=1)  # fmt: skip
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(cfg)


def t5_encoder(vocab, d_model):
    """A one-layer T5 encoder whose width ``d_model`` is the transformer's ``joint_attention_dim``."""
    transformers = _transformers()
    return transformers.T5EncoderModel(transformers.T5Config(vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=32,
                                                             num_layers=1, num_heads=2, pad_token_id=0,
                                                             eos_token_id=1))  # fmt: skip


def tiny_vae(latent_channels):
    """A one-block AutoencoderKL: no downsampling, latents as large as the images."""
    import diffusers

    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1,
                                   latent_channels=latent_channels, norm_num_groups=1, sample_size=16,
                                   use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.06,
                                   scaling_factor=1.5)  # fmt: skip


def _eval(pipe):
    """Every module in eval mode, as ``from_pretrained`` gives them (T5's dropout would make prompts random)."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def sd3_pipeline(workdir, t5: bool = True, seed: int = 0) -> diffusers.StableDiffusion3Pipeline:
    """A random-weight SD3 pipeline: two CLIP text encoders, with ``t5`` also the T5 encoder (as SD3.5 has; without
    it ``text_encoder_3`` and ``tokenizer_3`` are None and the pipeline pads with zeros). The CLIP tokenizer's files
    are written under ``workdir``. The global torch RNG is left as it was."""
    import diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok, n = clip_tokenizer(workdir)
        transformer = diffusers.SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4,
                                                      num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                                      joint_attention_dim=32, caption_projection_dim=16,
                                                      pooled_projection_dim=16, pos_embed_max_size=16)  # fmt: skip
        vae, text_encoder, text_encoder_2 = tiny_vae(4), clip_encoder(n), clip_encoder(n)
        text_encoder_3 = tokenizer_3 = None
        if t5:  # built last: the other weights are the same with and without it
            tokenizer_3, n5 = t5_tokenizer()
            text_encoder_3 = t5_encoder(n5, transformer.config.joint_attention_dim)
    return _eval(diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tok, text_encoder_2=text_encoder_2, tokenizer_2=tok,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    ))  # fmt: skip


def flux_pipeline(workdir, seed: int = 0) -> diffusers.FluxPipeline:
    """A random-weight FLUX.1-dev-like pipeline (``guidance_embeds=True``: guidance is an input, not CFG) with its
    CLIP and T5 text encoders. The CLIP tokenizer's files are written under ``workdir``. The global torch RNG is left
    as it was."""
    import diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok, n = clip_tokenizer(workdir)
        t5_tok, n5 = t5_tokenizer()
        t5 = t5_encoder(n5, 16)
        transformer = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                                       attention_head_dim=16, num_attention_heads=2,
                                                       joint_attention_dim=16, pooled_projection_dim=16,
                                                       axes_dims_rope=[4, 4, 8], guidance_embeds=True)  # fmt: skip
        vae, text_encoder = tiny_vae(4), clip_encoder(n, projection=False, hidden=16)
    return _eval(diffusers.FluxPipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=vae, text_encoder=text_encoder, tokenizer=tok, text_encoder_2=t5, tokenizer_2=t5_tok,
    ))  # fmt: skip


#: ``QwenImagePipeline.prompt_template_encode`` (diffusers 0.42): the chat template around every prompt. The pipeline
#: drops its first ``prompt_template_encode_start_idx`` = 34 tokens: the template's text before the prompt (system
#: prompt and user turn opening) as Qwen's tokenizer splits it.
QWEN_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

#: Qwen-Image's scheduler config (Qwen/Qwen-Image ``scheduler/scheduler_config.json``), the tiny pipeline's too
QWEN_SCHEDULER = {
    "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}  # fmt: skip


def qwen_tokenizer(root):
    """A Qwen2 byte-level BPE tokenizer: the 256 byte symbols (any text), whole-word tokens built by merges for the
    words of :data:`QWEN_TEMPLATE` (so that its text before the prompt is 34 tokens, as with Qwen's own vocabulary,
    and the pipeline's drop of 34 tokens leaves exactly the prompt and the template's end), and Qwen's special
    tokens.
    ``vocab.json`` and ``merges.txt`` are written under ``root``. Returns ``(tokenizer, vocab_size)``."""
    transformers = _transformers()
    from tokenizers import AddedToken, Regex, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    split = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])  # fmt: skip
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = []
    pieces = [QWEN_TEMPLATE.format("")]
    for special in QWEN_SPECIAL:  # the text between the special tokens, pre-tokenized as the tokenizer will
        pieces = [part for piece in pieces for part in piece.split(special)]
    words = [word for piece in pieces for word, _ in split.pre_tokenize_str(piece)]
    for word in words:
        for i in range(1, len(word)):  # word[:i] + word[i] -> word[:i + 1]: the word becomes one token
            if word[: i + 1] not in vocab:
                merges.append((word[:i], word[i]))
                vocab[word[: i + 1]] = len(vocab)
    for special in QWEN_SPECIAL:
        vocab[special] = len(vocab)
    os.makedirs(root, exist_ok=True)
    vocab_file, merges_file = os.path.join(root, "vocab.json"), os.path.join(root, "merges.txt")
    with open(vocab_file, "w") as fh:
        json.dump(vocab, fh)
    with open(merges_file, "w") as fh:
        fh.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = transformers.Qwen2Tokenizer(vocab_file, merges_file, unk_token="<|endoftext|>", eos_token="<|im_end|>",
                                      pad_token="<|endoftext|>", model_max_length=32768)  # fmt: skip
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL], special_tokens=True)
    return tok, len(vocab)


def qwen_text_encoder(vocab, tokenizer, hidden=16):
    """A one-layer Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``, Qwen-Image's text encoder) of width
    ``hidden`` (the transformer's ``joint_attention_dim``), with multimodal RoPE sections and a one-block vision
    tower that text prompts never run; its image and video token ids lie outside the tiny vocabulary."""
    transformers = _transformers()
    ids = tokenizer.convert_tokens_to_ids
    text = {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 2048,
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}, "rope_theta": 1000000.0,
            "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>")}  # fmt: skip
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": hidden,
              "fullatt_block_indexes": [0], "patch_size": 2, "temporal_patch_size": 2}  # fmt: skip
    cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=vocab + 3,
                                        video_token_id=vocab + 4, vision_start_token_id=vocab + 1,
                                        vision_end_token_id=vocab + 2)  # fmt: skip
    return transformers.Qwen2_5_VLForConditionalGeneration(cfg)


def qwenimage_pipeline(workdir, seed: int = 0) -> diffusers.QwenImagePipeline:
    """A random-weight Qwen-Image pipeline: a one-layer ``QwenImageTransformer2DModel`` (4 latent channels, 2x2
    patches), a two-level ``AutoencoderKLQwenImage`` (2x spatial downsampling, non-trivial ``latents_mean`` and
    ``latents_std``), a one-layer Qwen2.5-VL text encoder with the tokenizer of :func:`qwen_tokenizer` (its files
    written under ``workdir``) and Qwen-Image's scheduler config (:data:`QWEN_SCHEDULER`). The global torch RNG is
    left as it was."""
    import diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok, n = qwen_tokenizer(workdir)
        text_encoder = qwen_text_encoder(n, tok, hidden=16)
        transformer = diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4,
                                                            num_layers=1, attention_head_dim=16,
                                                            num_attention_heads=2, joint_attention_dim=16,
                                                            axes_dims_rope=(8, 4, 4))  # fmt: skip
        vae = diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                               temperal_downsample=[False], latents_mean=[0.1, -0.2, 0.3, -0.4],
                                               latents_std=[1.5, 0.8, 1.2, 2.0])  # fmt: skip
    return _eval(diffusers.QwenImagePipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), vae=vae, text_encoder=text_encoder,
        tokenizer=tok, transformer=transformer,
    ))  # fmt: skip


#: The tiny Wan pipeline's scheduler config: the form of Wan's published diffusers scheduler configs
#: (``UniPCMultistepScheduler``, flow sigmas, flow prediction, UniPC's bh2 solver of order 2) with ``flow_shift`` 5.0,
#: the pipeline docs' value for 720p (3.0 for 480p). Which shift each published Wan folder ships was not checked
#: offline: WanModel reads it from the folder's own scheduler config (or takes ``flow_shift``).
WAN_SCHEDULER = {
    "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "flow_shift": 5.0, "lower_order_final": True,
    "num_train_timesteps": 1000, "predict_x0": True, "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "solver_order": 2, "solver_p": None,
    "solver_type": "bh2", "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace",
    "trained_betas": None, "use_beta_sigmas": False, "use_exponential_sigmas": False, "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}  # fmt: skip


def umt5_encoder(vocab, d_model):
    """A one-layer UMT5 encoder (Wan's text encoder) of width ``d_model``, the transformer's ``text_dim``."""
    transformers = _transformers()
    return transformers.UMT5EncoderModel(transformers.UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=32,
                                                                 num_layers=1, num_heads=2, pad_token_id=0,
                                                                 eos_token_id=1))  # fmt: skip


def wan_pipeline(workdir, seed: int = 0) -> diffusers.WanPipeline:
    """A random-weight Wan 2.1 text-to-video pipeline: a one-layer ``WanTransformer3DModel`` (4 latent channels,
    1x2x2 patches), an ``AutoencoderKLWan`` with Wan's temporal factor 4 (two temporal downsamplings) but spatial
    factor 4 (the real one: 8), non-trivial ``latents_mean`` / ``latents_std``, a one-layer UMT5 encoder with the T5
    tokenizer of :func:`t5_tokenizer` (Wan's is a T5 tokenizer too) and the form of Wan's scheduler config
    (:data:`WAN_SCHEDULER`). ``workdir`` is unused (the signature of the other builders). The global torch RNG is left
    as it was."""
    import diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok, n = t5_tokenizer()
        text_encoder = umt5_encoder(n, 16)
        transformer = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2,
                                                      attention_head_dim=12, in_channels=4, out_channels=4,
                                                      text_dim=16, freq_dim=32, ffn_dim=32, num_layers=1,
                                                      cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                                      rope_max_seq_len=32)  # fmt: skip
        vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1,
                                         temperal_downsample=[True, True], latents_mean=[0.1, -0.2, 0.3, -0.4],
                                         latents_std=[1.5, 0.8, 1.2, 2.0], scale_factor_temporal=4,
                                         scale_factor_spatial=4)  # fmt: skip
    return _eval(diffusers.WanPipeline(
        tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=diffusers.UniPCMultistepScheduler(**WAN_SCHEDULER),
    ))  # fmt: skip


#: Z-Image's scheduler config (Tongyi-MAI/Z-Image-Turbo ``scheduler/scheduler_config.json`` as recalled offline: a
#: static shift of 3, no dynamic shifting), the tiny pipeline's too
ZIMAGE_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}

#: Qwen3's chat template reduced to what ``ZImagePipeline._encode_prompt`` uses: one user turn, the generation prompt,
#: ``enable_thinking=True`` (Qwen3's template adds an empty think block only when thinking is off)
QWEN3_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def zimage_pipeline(workdir, seed: int = 0) -> diffusers.ZImagePipeline:
    """A random-weight Z-Image pipeline: a ``ZImageTransformer2DModel`` with one layer of each kind (noise refiner,
    context refiner, main; 4 latent channels, 2x2 patches), a two-level ``AutoencoderKL`` (2x downsampling) with
    non-trivial ``scaling_factor`` and ``shift_factor``, a two-layer ``Qwen3Model`` text encoder (the pipeline takes
    its second-to-last hidden states) with the byte-level tokenizer of :func:`qwen_tokenizer` (files under
    ``workdir``) and Qwen3's chat template (:data:`QWEN3_CHAT_TEMPLATE`), and :data:`ZIMAGE_SCHEDULER`. The global
    torch RNG is left as it was."""
    import diffusers

    transformers = _transformers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok, n = qwen_tokenizer(workdir)
        tok.chat_template = QWEN3_CHAT_TEMPLATE
        ids = tok.convert_tokens_to_ids
        text_encoder = transformers.Qwen3Model(transformers.Qwen3Config(
            vocab_size=n, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=2048, bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        ))  # fmt: skip
        transformer = diffusers.ZImageTransformer2DModel(in_channels=4, dim=32, n_layers=1, n_refiner_layers=1,
                                                         n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                                                         axes_dims=[4, 6, 6], axes_lens=[256, 32, 32])  # fmt: skip
        vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                      down_block_types=["DownEncoderBlock2D"] * 2,
                                      up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16],
                                      layers_per_block=1, norm_num_groups=8, scaling_factor=0.37,
                                      shift_factor=0.11)  # fmt: skip
    return _eval(diffusers.ZImagePipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER), vae=vae, text_encoder=text_encoder,
        tokenizer=tok, transformer=transformer,
    ))  # fmt: skip


#: The tiny FLUX.2 pipeline's scheduler config: the form of FLUX.2-dev's (``FlowMatchEulerDiscreteScheduler`` with the
#: exponential dynamic shift; the pipeline computes ``mu`` itself, ``compute_empirical_mu``, so the shift constants
#: are unused). FLUX.2-dev's published file was not read offline: Flux2Model checks the settings its grid depends on.
FLUX2_SCHEDULER = {"use_dynamic_shifting": True, "time_shift_type": "exponential", "base_image_seq_len": 256,
                   "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15, "shift": 3.0}  # fmt: skip

#: Mistral's chat-template tokens, as FLUX.2-dev's tokenizer (a Pixtral processor of Mistral Small 3.1) marks the
#: system prompt and the user turn
MISTRAL_SPECIAL = ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ m['content'][0]['text'] }}"
    "[/SYSTEM_PROMPT]{% else %}[INST]{{ m['content'][0]['text'] }}[/INST]{% endif %}{% endfor %}"
)


def mistral_tokenizer():
    """A tokenizer with a Mistral-like chat template (system prompt, then the user turn) for the tiny FLUX.2: a
    Unigram model of single letters and digits plus the words of the pipeline's system message (so that the template
    is 26 tokens and a 512-token window keeps the prompt). The real one is a ``PixtralProcessor``; the pipeline only
    calls its ``apply_chat_template``, which a plain tokenizer has too. Returns ``(tokenizer, vocab_size)``."""
    transformers = _transformers()
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    space = "\u2581"
    special = ["<unk>", "<s>", "</s>", "<pad>", *MISTRAL_SPECIAL]
    words = sorted({space + w for w in SYSTEM_MESSAGE.split()})
    vocab = [(t, 0.0) for t in special] + [(space, -2.0)] + [(c, -1.0) for c in LETTERS] + [(w, 0.0) for w in words]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0))
    metaspace = {"replacement": space, "prepend_scheme": "always", "split": True}
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)]
    )
    tok.decoder = decoders.Metaspace(**metaspace)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<pad>",
                                                additional_special_tokens=list(MISTRAL_SPECIAL), model_max_length=512,
                                                chat_template=MISTRAL_TEMPLATE), len(vocab)  # fmt: skip


def mistral3_encoder(vocab, hidden=8):
    """A ``Mistral3ForConditionalGeneration`` (FLUX.2-dev's text encoder) of width ``hidden`` with 30 text layers (the
    pipeline stacks hidden states 10, 20 and 30) and a one-layer Pixtral vision tower that text prompts never run."""
    transformers = _transformers()
    text = {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 16, "num_hidden_layers": 30,
            "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": hidden // 2,
            "max_position_embeddings": 1024, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}  # fmt: skip
    vision = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 16, "head_dim": 8}  # fmt: skip
    cfg = transformers.Mistral3Config(text_config=text, vision_config=vision, image_token_index=vocab + 1)
    return transformers.Mistral3ForConditionalGeneration(cfg)


def flux2_pipeline(workdir, seed: int = 0) -> diffusers.Flux2Pipeline:
    """A random-weight FLUX.2-dev-like pipeline: a ``Flux2Transformer2DModel`` of one double and one single block
    (``guidance_embeds=True``, 4-axis RoPE), an ``AutoencoderKLFlux2`` with one 2x downsampling (the real one: 8x) and
    4 latent channels whose batch-norm statistics (over the 16 channels of 2x2 patches) are set non-trivial, the
    30-layer Mistral3 text encoder of :func:`mistral3_encoder` with :func:`mistral_tokenizer` and the form of
    FLUX.2's scheduler config (:data:`FLUX2_SCHEDULER`). ``workdir`` is unused. The global torch RNG is left as it
    was."""
    import diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok, n = mistral_tokenizer()
        text_encoder = mistral3_encoder(n, hidden=8)
        transformer = diffusers.Flux2Transformer2DModel(in_channels=16, num_layers=1, num_single_layers=1,
                                                        attention_head_dim=16, num_attention_heads=2,
                                                        joint_attention_dim=24, timestep_guidance_channels=32,
                                                        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True)  # fmt: skip
        vae = diffusers.AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                           up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                                           latent_channels=4, norm_num_groups=4, sample_size=16)  # fmt: skip
        vae.bn.running_mean.copy_(torch.linspace(-0.3, 0.3, 16))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, 16))
    return _eval(diffusers.Flux2Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER), vae=vae, text_encoder=text_encoder,
        tokenizer=tok, transformer=transformer,
    ))  # fmt: skip


def _save_clip(folder: str, workdir: str, seed: int) -> None:
    """A random-weight transformers CLIPModel (32x32 images in 8x8 patches, 16-d embeddings) and its processor."""
    transformers = _transformers()
    tokenizer, n = clip_tokenizer(workdir)
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    config = transformers.CLIPConfig(
        text_config={"vocab_size": n, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "eos_token_id": 1, "bos_token_id": 0,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.CLIPModel(config)
    model.save_pretrained(folder)


def save_tiny(kind: str, folder: str, seed: int = 0) -> str:
    """Write a tiny random-weight model of ``kind`` (one of :data:`KINDS`) to ``folder``, which is created and must
    not exist or be empty. ``"sd3"`` (with T5, as SD3.5), ``"flux"``, ``"qwenimage"``, ``"wan"`` and ``"zimage"``: a
    diffusers pipeline folder (load it with ``tempflow.models.load_model(folder, ...)``); ``"clip"``: a transformers
    CLIPModel + CLIPProcessor folder (for ``PickScore(folder)`` or ``Aesthetic(folder, head)``). Returns ``folder``."""
    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}: choose one of {', '.join(KINDS)}")
    folder = os.fspath(folder)
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise FileExistsError(f"{folder!r} exists and is not an empty folder: give a new or empty folder")
    created = not os.path.exists(folder)
    os.makedirs(folder, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory() as workdir:  # the tokenizer's source files; the folder gets its own copy
            if kind == "clip":
                _save_clip(folder, workdir, seed)
            else:
                build = {
                    "sd3": sd3_pipeline,
                    "flux": flux_pipeline,
                    "qwenimage": qwenimage_pipeline,
                    "wan": wan_pipeline,
                    "zimage": zimage_pipeline,
                    "flux2": flux2_pipeline,
                }[kind]
                build(workdir, seed=seed).save_pretrained(folder)
    except BaseException:  # leave no half-written model behind (the folder was new or empty)
        shutil.rmtree(folder, ignore_errors=True)
        if not created:
            os.makedirs(folder, exist_ok=True)
        raise
    return folder
