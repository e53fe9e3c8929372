"""MiniGPT-4, assembled as its authors build it: BLIP-2's frozen vision tower and Q-Former
(transformers' Blip2 modules, weights from a BLIP-2 checkpoint in Hugging Face layout), one linear
projection (``llama_proj`` from MiniGPT-4's released checkpoint) and Vicuna as a
``LlamaForCausalLM``. MiniGPT-4 is not a transformers class, so the assembly lives here.

Prompt layout, as MiniGPT-4's code builds it: the prompt is split at ``<ImageHere>``; the part
before is tokenized with BOS, the projected query features take the placeholder's place, the
part after is tokenized without BOS: ``###Human: <Img><ImageHere></Img> {prompt}`` followed by
the assistant marker (``###Assistant:``, a setting).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import (AutoTokenizer, Blip2Config, Blip2QFormerModel, Blip2VisionModel,
                          LlamaForCausalLM, PreTrainedTokenizerBase)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from mmke.backbones.base import EncodedPrompt, ModelBatch
from mmke.backbones.caches import PixelCache, TokenCache
from mmke.backbones.fixed import FixedImageTokens
from mmke.backbones.encoding import encode_pair, split_target
from mmke.backbones.roles import LayerRoles
from mmke.backbones.weights import check_weights_path
from mmke.data.record import Prompt
from mmke.devices import resolve_device, resolve_dtype
from mmke.errors import WeightsNotFoundError

IMAGE_HERE = "<ImageHere>"
MINIGPT4_PROMPT = "###Human: <Img><ImageHere></Img> {}"
MINIGPT4_TEXT_PROMPT = "###Human: {}"
ASSISTANT_MARKER = " ###Assistant:"
#: stands for an image position in input_ids; Vicuna's vocabulary has no image token, so a
#: negative id (as in LLaVA's and MiniGPT-4's own code) can never collide with text
IMAGE_PLACEHOLDER_ID = -200
PROJECTION_KEYS = ("llama_proj.weight", "llama_proj.bias")


class MiniGPT4(nn.Module):
    """The assembled model: vision tower → Q-Former(query tokens) → ``llama_proj`` → Vicuna."""

    def __init__(self, vision_model: Blip2VisionModel, qformer: Blip2QFormerModel,
                 query_tokens: nn.Parameter, llama_proj: nn.Linear,
                 language_model: LlamaForCausalLM) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.qformer = qformer
        self.query_tokens = query_tokens
        self.llama_proj = llama_proj
        self.language_model = language_model

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected Q-Former outputs, [n_images, num_query_tokens, llama_hidden]."""
        image_embeds = self.vision_model(pixel_values).last_hidden_state
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        states = self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                              encoder_attention_mask=mask).last_hidden_state
        return self.llama_proj(states)


class MiniGPT4Backbone(FixedImageTokens):
    """Adapter over an assembled MiniGPT-4, Vicuna's tokenizer and BLIP-2's image processor."""

    family = "minigpt4"

    def __init__(self, model: MiniGPT4, tokenizer: PreTrainedTokenizerBase,
                 image_processor: BlipImageProcessorPil, prompt_format: str = MINIGPT4_PROMPT,
                 text_prompt_format: str = MINIGPT4_TEXT_PROMPT,
                 assistant_marker: str = ASSISTANT_MARKER, name: str = "minigpt4",
                 pixel_cache_size: int = 512, bos_token: bool = True) -> None:
        if prompt_format.count(IMAGE_HERE) != 1 or IMAGE_HERE in text_prompt_format:
            raise ValueError(f"backbone.prompt_format must contain {IMAGE_HERE} once and "
                             f"backbone.text_prompt_format none; got {prompt_format!r} and "
                             f"{text_prompt_format!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.prompt_format = prompt_format
        self.text_prompt_format = text_prompt_format
        self.assistant_marker = assistant_marker
        self.name = name
        self.image_token_id = IMAGE_PLACEHOLDER_ID
        self.num_image_tokens = model.num_query_tokens
        self.pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.unk_token_id, 0)
                           if t is not None)
        # MiniGPT-4's own code starts with Llama's BOS; EasyEdit's editing forward does not
        self.bos_id = tokenizer.bos_token_id if bos_token else None
        self.eos_id = tokenizer.eos_token_id
        self._modules = LayerRoles(model.language_model.model.layers, ffn_in="mlp.up_proj",
                                   ffn_gate="mlp.gate_proj", ffn_out="mlp.down_proj",
                                   attention="self_attn", projector=model.llama_proj,
                                   vision_tower=model.vision_model)
        self._pixels = PixelCache(self._process_images, pixel_cache_size)
        self._token_ids = TokenCache(tokenizer)

    @property
    def decoder(self) -> nn.Module:
        return self.model.language_model

    def encode(self, prompt: Prompt, append_eos: bool = False,
               with_target: bool = True) -> EncodedPrompt:
        fmt = self.prompt_format if prompt.image is not None else self.text_prompt_format
        text = fmt.format(prompt.text) + self.assistant_marker
        before, after = text.split(IMAGE_HERE) if prompt.image is not None else ("", text)
        prefix = [self.bos_id] if self.bos_id is not None else []
        if prompt.image is not None:
            prefix += self._token_ids(before) + [IMAGE_PLACEHOLDER_ID] * self.num_image_tokens
        if with_target:
            after_ids, target = split_target(self._token_ids, after, prompt.target)
        else:
            after_ids, target = self._token_ids(after), []
        if append_eos and self.eos_id is not None:
            target = target + [self.eos_id]
        return encode_pair(prefix + after_ids, target, prompt.image, IMAGE_PLACEHOLDER_ID,
                           self.num_image_tokens, where=f"{prompt.kind} prompt {text!r}")

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.image_features(pixel_values)

    def embedding_ids(self, batch: ModelBatch) -> torch.Tensor:
        # the image placeholder is not a Vicuna token: embed padding there, then overwrite it
        return batch.input_ids.masked_fill(batch.image_token_mask, self.pad_id)

    def answer_text(self, decoded: str) -> str:
        """Cut where the next turn begins ("###"): MiniGPT-4's Vicuna ends its turn with the
        separator it was trained on (its ``end_sym``), which its own chat code stops at and
        splits off. A prompt without the assistant marker (EasyEdit's template) may be answered
        with the marker first; it is dropped rather than read as the end of an empty answer."""
        marker = ASSISTANT_MARKER.strip()
        return decoded.strip().removeprefix(marker).split("###", 1)[0].strip()


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    return sorted(folder.glob("*.safetensors"))


def load_blip2_vision(folder: str, dtype: torch.dtype) -> tuple[Blip2VisionModel, Blip2QFormerModel,
                                                                nn.Parameter]:
    """BLIP-2's vision tower, Q-Former and query tokens from a checkpoint in Hugging Face layout,
    reading only those tensors (not the language model) from its safetensors files."""
    config = Blip2Config.from_pretrained(folder)
    vision = Blip2VisionModel(config.vision_config)
    qformer = Blip2QFormerModel(config.qformer_config)
    query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens,
                                            config.qformer_config.hidden_size))
    parts = {"vision_model.": vision, "qformer.": qformer}
    states: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in parts}
    files = _safetensors_files(Path(folder))
    if not files:
        raise WeightsNotFoundError(f"{folder} has no *.safetensors files; backbone.blip2_path must "
                                   "be a BLIP-2 checkpoint in Hugging Face layout")
    found_query = False
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key == "query_tokens":
                    query_tokens.data.copy_(f.get_tensor(key))
                    found_query = True
                for prefix in parts:
                    if key.startswith(prefix):
                        states[prefix][key[len(prefix):]] = f.get_tensor(key)
    if not found_query:
        raise WeightsNotFoundError(f"no query_tokens in the BLIP-2 checkpoint at {folder}")
    for prefix, module in parts.items():
        missing, unexpected = module.load_state_dict(states[prefix], strict=False)
        if missing:
            raise WeightsNotFoundError(f"the BLIP-2 checkpoint at {folder} lacks {len(missing)} "
                                       f"{prefix.rstrip('.')} tensors, e.g. {prefix}{missing[0]}")
    return vision.to(dtype), qformer.to(dtype), nn.Parameter(query_tokens.data.to(dtype))


def load_projection(path: str, in_features: int, out_features: int) -> nn.Linear:
    """``llama_proj`` from MiniGPT-4's released checkpoint (a torch file with a ``model`` dict, read
    with ``weights_only=True``) or from a safetensors file with the same key names."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise WeightsNotFoundError(
            f"no MiniGPT-4 checkpoint at backbone.projection_path={path}; set it to the released "
            "checkpoint file (e.g. pretrained_minigpt4_7b.pth) holding llama_proj.weight/bias")
    if file.suffix == ".safetensors":
        with safe_open(str(file), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    else:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
        state = loaded.get("model", loaded)
    missing = [k for k in PROJECTION_KEYS if k not in state]
    if missing:
        raise WeightsNotFoundError(f"{file} has no {', '.join(missing)}; it is not a MiniGPT-4 "
                                   "checkpoint (keys found: " + ", ".join(sorted(state)[:5]) + ")")
    weight = state["llama_proj.weight"]
    if tuple(weight.shape) != (out_features, in_features):
        raise ValueError(f"{file}: llama_proj.weight has shape {tuple(weight.shape)}, expected "
                         f"({out_features}, {in_features}) for this Q-Former and Vicuna")
    projection = nn.Linear(in_features, out_features)
    projection.load_state_dict({"weight": weight, "bias": state["llama_proj.bias"]})
    return projection


def load_minigpt4(blip2_path: str | None, projection_path: str | None, llama_path: str | None,
                  dtype: str = "float32", device: str = "auto",
                  device_map: str | dict | None = None, prompt_format: str = MINIGPT4_PROMPT,
                  text_prompt_format: str = MINIGPT4_TEXT_PROMPT,
                  assistant_marker: str = ASSISTANT_MARKER, name: str = "minigpt4",
                  local_files_only: bool = True, bos_token: bool = True) -> MiniGPT4Backbone:
    """Assemble MiniGPT-4 from its three sources; each missing one is named in the error.
    The prompt defaults are MiniGPT-4's own template with BOS; ``conf/backbone/minigpt4.yaml``
    sets EasyEdit's (no assistant marker, bare text-only prompts, no BOS)."""
    if not projection_path:
        raise WeightsNotFoundError("backbone.projection_path is not set; set it to MiniGPT-4's "
                                   "released checkpoint (e.g. pretrained_minigpt4_7b.pth)")
    blip2 = check_weights_path(blip2_path, family="BLIP-2 (its vision tower and Q-Former, e.g. "
                               "Salesforce/blip2-flan-t5-xxl)", local_files_only=True,
                               setting="backbone.blip2_path")
    llama = check_weights_path(llama_path, family="Vicuna-7B (LlamaForCausalLM)",
                               local_files_only=local_files_only, setting="backbone.llama_path")
    torch_dtype = resolve_dtype(dtype)
    vision, qformer, query_tokens = load_blip2_vision(blip2, torch_dtype)
    language_model = LlamaForCausalLM.from_pretrained(llama, dtype=torch_dtype,
                                                      device_map=device_map,
                                                      local_files_only=local_files_only)
    projection = load_projection(projection_path, qformer.config.hidden_size,
                                 language_model.config.hidden_size).to(torch_dtype)
    model = MiniGPT4(vision, qformer, query_tokens, projection, language_model)
    if device_map is None:
        model = model.to(resolve_device(device))
    else:  # the vision side goes where the language model starts
        first = language_model.get_input_embeddings().weight.device
        for part in (vision, qformer, projection):
            part.to(first)
        model.query_tokens.data = model.query_tokens.data.to(first)
    tokenizer = AutoTokenizer.from_pretrained(llama, local_files_only=local_files_only)
    processor = BlipImageProcessorPil.from_pretrained(blip2, local_files_only=True)
    return MiniGPT4Backbone(model, tokenizer, processor, prompt_format=prompt_format,
                            text_prompt_format=text_prompt_format,
                            assistant_marker=assistant_marker, name=name, bos_token=bos_token)


def save_minigpt4_parts(backbone: MiniGPT4Backbone, projection_file: Path, llama_folder: Path) -> None:
    """Write the parts MiniGPT-4 trains in the released layout: ``llama_proj`` in a checkpoint
    file under ``model``, and the language model with its tokenizer in Hugging Face layout.
    (The vision side is BLIP-2's and stays in the BLIP-2 checkpoint.)"""
    proj = backbone.model.llama_proj
    torch.save({"model": {"llama_proj.weight": proj.weight.detach().cpu(),
                          "llama_proj.bias": proj.bias.detach().cpu()}}, projection_file)
    backbone.model.language_model.save_pretrained(llama_folder)
    backbone.tokenizer.save_pretrained(llama_folder)
