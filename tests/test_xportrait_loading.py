"""Loading X-Portrait weights (tiny config, CPU): the released checkpoint's layout, SD1.5 bases,
bad files, LCM-LoRA fusing.

Checkpoints are synthetic: tests/released_layout.py writes the released key layout from the
released code's module structure. What lands in our modules is checked against diffusers' own
ldm converters (an implementation independent of engines/xportrait/weights) and against keys mapped by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_animatediff_checkpoint_to_diffusers,
    convert_controlnet_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from engines import create_engine
from engines.base import EngineError
from engines.xportrait.config import XPortraitConfig
from engines.xportrait.weights import (
    WeightsError,
    fuse_lora,
    load_model,
    map_released,
    to_released,
    write_released,
)
from engines.xportrait.model import XPortraitModel
from fixtures import one_torch_thread  # tests/ is on sys.path
from released_layout import (  # tests/ is on sys.path (pytest's rootdir-less import)
    SD_PARTS,
    clip_text,
    ddpm_buffers,
    positional_table,
    released_shapes,
    released_state_dict,
    write_checkpoint,
)

CONFIG = XPortraitConfig.tiny()
MOTION_IN = "model.diffusion_model.input_blocks_motion_module"
MOTION_OUT = "model.diffusion_model.output_blocks_motion_module"
EMPTY_PROMPT = [49406] + [49407] * 76


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(file path, its state dict, the model loaded from it)."""
    sd = released_state_dict(CONFIG, seed=0)
    path = write_checkpoint(tmp_path_factory.mktemp("released") / "model_state-1.th", sd)
    return path, sd, load_model(CONFIG, checkpoint=path)


def sub(sd: dict, prefix: str, new_prefix: str = "", skip: str | None = None) -> dict:
    return {new_prefix + k[len(prefix):]: v for k, v in sd.items()
            if k.startswith(prefix) and (skip is None or skip not in k)}


def assert_module_equals(module: torch.nn.Module, expected: dict[str, torch.Tensor], what: str) -> None:
    ours = module.state_dict()
    assert set(ours) == set(expected), f"{what}: {sorted(set(ours) ^ set(expected))[:5]}"
    differ = [k for k, v in ours.items() if not torch.equal(v, expected[k].reshape(v.shape))]
    assert not differ, f"{what}: {differ[:5]}"


def clip_embedding(text_weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The empty prompt through transformers' CLIP text tower, given `text_model.*` weights."""
    clip = CLIPTextModel(CLIPTextConfig(**CONFIG.text_kwargs()))
    if not any(k.startswith("text_model.") for k in clip.state_dict()):  # transformers >= 5 flattens it
        text_weights = {k.removeprefix("text_model."): v for k, v in text_weights.items()}
    missing, unexpected = clip.load_state_dict(text_weights, strict=False)
    assert not missing and set(unexpected) <= {"embeddings.position_ids", "text_model.embeddings.position_ids"}
    with torch.no_grad():
        return clip.eval()(input_ids=torch.tensor([EMPTY_PROMPT])).last_hidden_state


def noise_prediction(model: XPortraitModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    frames, size = 2, CONFIG.latent_size
    sample = torch.randn(frames, 4, size, size, generator=g)
    source = torch.randn(1, 4, size, size, generator=g)
    hints = torch.rand(2, frames, 3, CONFIG.resolution, CONFIG.resolution, generator=g) * 2 - 1
    t = torch.tensor([500])
    reference = model.reference_features([source], t)
    return model.predict_noise(sample, t, frames, reference, hints[0], hints[1])


# -- the layout generator ------------------------------------------------------------------------

def test_layout_has_the_counts_derived_from_the_released_code():
    shapes = released_shapes(XPortraitConfig.sd15())
    count = lambda pred: sum(1 for k in shapes if pred(k))  # noqa: E731
    assert count(lambda k: k.startswith("model.diffusion_model.") and "_motion_module." not in k) == 686
    assert count(lambda k: "_motion_module." in k) == 560
    assert count(lambda k: k.startswith("appearance_control_model.")) == 698
    assert count(lambda k: k.startswith("pose_control_model.")) == 340
    assert count(lambda k: k.startswith("local_pose_control_model.")) == 340
    assert count(lambda k: k.startswith("first_stage_model.")) == 248
    assert count(lambda k: k.startswith("cond_stage_model.")) == 197
    assert len(shapes) == 3082
    assert shapes["model.diffusion_model.input_blocks.4.0.skip_connection.weight"] == (640, 320, 1, 1)
    assert shapes["model.diffusion_model.output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes["pose_control_model.input_hint_block.14.weight"] == (320, 256, 3, 3)


def test_the_sd15_sized_layout_maps_completely():
    """At full size, shapes only (meta tensors): every key lands, every tensor is filled."""
    config = XPortraitConfig.sd15()
    sd = {}
    for key, shape in released_shapes(config).items():
        sd[key] = torch.empty(shape, device="meta")
    sd.update(ddpm_buffers(config))
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    for key in [k for k in sd if k.endswith("pos_encoder.pe")]:
        sd[key] = positional_table(sd[key].shape[1], sd[key].shape[2])
    mapped = map_released(config, sd)
    # 3082 keys: 16 unused hint-encoder tensors, CLIP's position ids and 13 schedule buffers are
    # not weights, and each temporal module's two positional tables are one for us.
    assert len(mapped) == 3082 - 16 - 1 - 13 - 20
    assert mapped["unet.unet.up_blocks.1.upsamplers.0.conv.weight"].shape == (1280, 1280, 3, 3)
    assert mapped["vae.decoder.mid_block.attentions.0.to_k.weight"].shape == (512, 512)


# -- the released checkpoint ---------------------------------------------------------------------

def test_released_checkpoint_fills_every_module_as_diffusers_converts_it(released):
    _, sd, model = released
    unet_part = sub(sd, "model.diffusion_model.", "model.diffusion_model.", skip="_motion_module.")
    assert_module_equals(model.unet.unet, convert_ldm_unet_checkpoint(unet_part, model.unet.unet.config), "unet")
    appearance = sub(sd, "appearance_control_model.", "model.diffusion_model.", skip="input_hint_block")
    assert_module_equals(model.reference_net.unet,
                         convert_ldm_unet_checkpoint(appearance, model.reference_net.unet.config), "reference net")
    for prefix, net in (("pose_control_model.", model.pose_controlnet),
                        ("local_pose_control_model.", model.local_controlnet)):
        assert_module_equals(net, convert_controlnet_checkpoint(sub(sd, prefix), net.config), prefix)
    assert_module_equals(model.vae, convert_ldm_vae_checkpoint(sd, model.vae.config), "vae")

    # Motion modules: the k-th down module sits at level k // 2, the k-th up one at k // 3
    # (layers_per_block 2), then AnimateDiff's renames (diffusers' converter drops pos_encoder).
    motion = {}
    for key, value in sd.items():
        m = re.match(r"model\.diffusion_model\.(input|output)_blocks_motion_module\.(\d+)\.0\.(.*)", key)
        if m and "pos_encoder" not in key:
            k, per = int(m[2]), (2 if m[1] == "input" else 3)
            level = "down_blocks" if m[1] == "input" else "up_blocks"
            motion[f"{level}.{k // per}.motion_modules.{k % per}.{m[3]}"] = value
    motion = convert_animatediff_checkpoint_to_diffusers(motion)
    ours = model.unet.motion.state_dict()
    tables = [k for k in ours if k.endswith("pos_embed.pe")]
    assert len(tables) == 20 and set(ours) - set(tables) == set(motion)
    assert all(torch.equal(ours[k], motion[k]) for k in motion)
    assert all(torch.equal(ours[k], positional_table(CONFIG.motion_max_len, ours[k].shape[2])) for k in tables)

    prefix = "cond_stage_model.transformer."
    torch.testing.assert_close(model.text, clip_embedding(sub(sd, prefix)), rtol=0, atol=0)


def test_keys_mapped_by_hand(released):
    _, sd, model = released
    ours = model.state_dict()
    by_hand = {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight":
            "unet.unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.input_blocks.6.0.op.weight": "unet.unet.down_blocks.1.downsamplers.0.conv.weight",
        "model.diffusion_model.input_blocks.7.0.skip_connection.weight":
            "unet.unet.down_blocks.2.resnets.0.conv_shortcut.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.bias": "unet.unet.mid_block.resnets.1.time_emb_proj.bias",
        "model.diffusion_model.output_blocks.2.1.conv.weight": "unet.unet.up_blocks.0.upsamplers.0.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.bias": "unet.unet.up_blocks.1.upsamplers.0.conv.bias",
        "model.diffusion_model.output_blocks.11.1.proj_out.weight":
            "unet.unet.up_blocks.3.attentions.2.proj_out.weight",
        "model.diffusion_model.out.2.weight": "unet.unet.conv_out.weight",
        f"{MOTION_IN}.3.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_k.weight":
            "unet.motion.down_blocks.1.motion_modules.1.transformer_blocks.0.attn2.to_k.weight",
        f"{MOTION_OUT}.7.0.temporal_transformer.transformer_blocks.0.norms.0.weight":
            "unet.motion.up_blocks.2.motion_modules.1.transformer_blocks.0.norm1.weight",
        f"{MOTION_OUT}.11.0.temporal_transformer.transformer_blocks.0.ff_norm.bias":
            "unet.motion.up_blocks.3.motion_modules.2.transformer_blocks.0.norm3.bias",
        f"{MOTION_OUT}.0.0.temporal_transformer.proj_out.weight":
            "unet.motion.up_blocks.0.motion_modules.0.proj_out.weight",
        "appearance_control_model.output_blocks.8.1.transformer_blocks.0.attn2.to_v.weight":
            "reference_net.unet.up_blocks.2.attentions.2.transformer_blocks.0.attn2.to_v.weight",
        "pose_control_model.zero_convs.11.0.weight": "pose_controlnet.controlnet_down_blocks.11.weight",
        "pose_control_model.input_hint_block.14.weight": "pose_controlnet.controlnet_cond_embedding.conv_out.weight",
        "pose_control_model.input_hint_block.6.bias": "pose_controlnet.controlnet_cond_embedding.blocks.2.bias",
        "local_pose_control_model.middle_block_out.0.bias": "local_controlnet.controlnet_mid_block.bias",
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight":
            "vae.decoder.up_blocks.3.resnets.0.conv_shortcut.weight",
        "first_stage_model.encoder.down.2.downsample.conv.weight":
            "vae.encoder.down_blocks.2.downsamplers.0.conv.weight",
        "first_stage_model.quant_conv.bias": "vae.quant_conv.bias",
    }
    for theirs, mine in by_hand.items():
        assert torch.equal(ours[mine], sd[theirs]), theirs
    # ldm's attention is 1x1 convolutions; diffusers' is linear layers
    q = sd["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert q.shape[2:] == (1, 1) and torch.equal(ours["vae.encoder.mid_block.attentions.0.to_q.weight"], q[:, :, 0, 0])


def test_loaded_weights_change_the_output(released):
    path, _, model = released
    torch.manual_seed(0)
    fresh = XPortraitModel(CONFIG).eval()
    loaded = noise_prediction(model)
    assert torch.isfinite(loaded).all()
    assert (loaded - noise_prediction(fresh)).abs().mean() > 0.1 * loaded.abs().mean()
    assert torch.equal(noise_prediction(load_model(CONFIG, checkpoint=path)), loaded)  # the file decides


def test_random_weights_are_seeded_and_finite():
    a, b = load_model(CONFIG, random_weights=True, seed=1), load_model(CONFIG, random_weights=True, seed=1)
    out = noise_prediction(a)
    assert torch.isfinite(out).all() and torch.equal(out, noise_prediction(b))
    assert not torch.equal(out, noise_prediction(load_model(CONFIG, random_weights=True, seed=2)))
    with pytest.raises(WeightsError, match="random_weights"):
        load_model(CONFIG, checkpoint="model_state-1.th", random_weights=True)
    with pytest.raises(WeightsError, match="no weights given"):
        load_model(CONFIG)


# -- the released layout written back -------------------------------------------------------------

NOT_HELD = ("cond_stage_model.", "appearance_control_model.input_hint_block.")


def test_to_released_gives_back_every_key_and_tensor_of_the_release(released, tmp_path):
    """released layout -> load -> to_released: the same keys, dtypes and values; what the model
    does not hold (CLIP's tower: it keeps the embedding; the never-called hint encoder) comes
    back through `extra`, and the written file loads to the same model."""
    path, sd, model = released
    out = to_released(CONFIG, model)
    not_held = {k for k in sd if k.startswith(NOT_HELD)}
    assert len(not_held) == len(clip_text(CONFIG)) + 16
    assert set(out) == set(sd) - not_held
    differ = [k for k in out if out[k].dtype != sd[k].dtype or not torch.equal(out[k], sd[k])]
    assert not differ, differ[:5]

    full = to_released(CONFIG, model, extra={k: sd[k] for k in not_held})
    assert set(full) == set(sd) and all(torch.equal(full[k], sd[k]) for k in sd)
    again = load_model(CONFIG, checkpoint=write_released(tmp_path / "model_state-export.th", full))
    assert_module_equals(again, model.state_dict(), "reloaded")
    assert torch.equal(again.text, model.text)

    with pytest.raises(WeightsError, match="not a part the model lacks"):
        to_released(CONFIG, model, extra={"pose_control_model.zero_convs.0.0.weight": torch.zeros(1)})


def test_to_released_names_the_sd15_model_as_the_release_does():
    """At full size (meta tensors): the released names and shapes, all 3082 but what the model lacks."""
    config = XPortraitConfig.sd15()
    with torch.device("meta"):
        model = XPortraitModel(config)
    out = to_released(config, model)
    shapes = released_shapes(config)
    assert set(out) == {k for k in shapes if not k.startswith(NOT_HELD)}
    assert len(out) == 3082 - 197 - 16
    wrong = [k for k, v in out.items() if tuple(v.shape) != shapes[k]]
    assert not wrong, wrong[:5]


class TrainingArguments:
    """A Python object a training script may save beside the weights; counts its unpicklings."""

    unpickled = 0

    def __setstate__(self, state):
        TrainingArguments.unpickled += 1
        self.__dict__.update(state)


def test_python_objects_in_a_checkpoint_are_refused_in_one_line_unless_trusted(released, tmp_path):
    path, sd, model = released
    args = TrainingArguments()
    args.lr = 1e-5
    file = tmp_path / "model_state-with-args.th"
    torch.save({"state_dict": {**sd, "global_step": 415001}, "args": args}, file)
    TrainingArguments.unpickled = 0
    with pytest.raises(WeightsError) as e:
        load_model(CONFIG, checkpoint=file)
    message = str(e.value)
    assert "\n" not in message and str(file) in message
    assert "holds Python objects besides tensors (first: test_xportrait_loading.TrainingArguments)" in message
    assert "--trust-checkpoint" in message and "trust_checkpoint=True" in message
    assert TrainingArguments.unpickled == 0  # refused before anything was unpickled

    trusted = load_model(CONFIG, checkpoint=file, trust_checkpoint=True)  # global_step: left out, not an error
    assert TrainingArguments.unpickled == 1
    assert_module_equals(trusted, model.state_dict(), "trusted")


    # The command line: --trust-checkpoint reaches the engine, which says what to pass without it.
    from streamer.options import add_engine_arguments, engine_options

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    flags = ["--engine", "xportrait", "--size", str(CONFIG.resolution), "--checkpoint", str(file),
             "--model-size", "tiny", "--device", "cpu"]
    assert engine_options(parser.parse_args(flags)).trust_checkpoint is False
    options = engine_options(parser.parse_args(flags + ["--trust-checkpoint"]))
    assert options.trust_checkpoint is True
    with pytest.raises(EngineError, match="pass --trust-checkpoint"):
        create_engine(dataclasses.replace(options, trust_checkpoint=False))
    engine = create_engine(options)
    assert_module_equals(engine.model, model.state_dict(), "engine")


# -- bad checkpoints -----------------------------------------------------------------------------

def test_a_renamed_key_is_named_with_the_parameter_it_leaves_empty(released, tmp_path):
    _, sd, _ = released
    old = "pose_control_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    new = old.replace("to_k", "to_kk")
    bad = dict(sd)
    bad[new] = bad.pop(old)
    with pytest.raises(WeightsError) as e:
        load_model(CONFIG, checkpoint=write_checkpoint(tmp_path / "model_state-2.th", bad))
    message = str(e.value)
    assert new in message
    assert "pose_controlnet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight" in message
    assert "1 key(s) match nothing" in message and "no weights for 1 of the model's" in message
    assert isinstance(e.value, EngineError)


def test_a_wrong_shape_is_named_with_both_shapes(released, tmp_path):
    _, sd, _ = released
    key = "model.diffusion_model.middle_block.1.proj_in.weight"
    bad = dict(sd)
    bad[key] = torch.zeros(64, 64, 3, 3)
    with pytest.raises(WeightsError) as e:
        load_model(CONFIG, checkpoint=write_checkpoint(tmp_path / "model_state-3.th", bad))
    message = str(e.value)
    assert key in message and "unet.unet.mid_block.attentions.0.proj_in.weight" in message
    assert "[64, 64, 3, 3]" in message and "[64, 64, 1, 1]" in message


def test_a_foreign_schedule_or_position_table_is_refused(released, tmp_path):
    _, sd, _ = released
    bad = dict(sd)
    bad["alphas_cumprod"] = torch.cumprod(1 - torch.linspace(1e-4, 2e-2, 1000), 0)  # DDPM's linear betas
    pe = "model.diffusion_model.input_blocks_motion_module.0.0.temporal_transformer.transformer_blocks.0" \
         ".attention_blocks.1.pos_encoder.pe"
    bad[pe] = bad[pe] + 0.5
    bad["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).flip(0)[None]
    with pytest.raises(WeightsError) as e:
        load_model(CONFIG, checkpoint=write_checkpoint(tmp_path / "model_state-4.th", bad))
    message = str(e.value)
    assert "alphas_cumprod is not SD1.5's" in message
    assert pe in message and "both map to" in message
    assert "position_ids is not 0..76" in message


def test_unreadable_files_are_refused_with_their_path(released, tmp_path):
    path, _, _ = released
    garbage = tmp_path / "model_state-5.th"
    garbage.write_bytes(b"this is not a checkpoint\n" * 40)
    truncated = tmp_path / "model_state-6.th"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    bad_safetensors = tmp_path / "sd15.safetensors"
    bad_safetensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    text = tmp_path / "weights.txt"
    text.write_text("hello")
    for bad in (garbage, truncated):
        with pytest.raises(WeightsError, match=re.escape(str(bad))):
            load_model(CONFIG, checkpoint=bad)
    with pytest.raises(WeightsError, match=re.escape(str(bad_safetensors))):
        load_model(CONFIG, base=bad_safetensors, checkpoint=path)
    with pytest.raises(WeightsError, match="unknown weights format '.txt'"):
        load_model(CONFIG, checkpoint=text)
    missing = tmp_path / "nowhere" / "model_state-7.th"
    with pytest.raises(WeightsError, match=f"checkpoint not found: {re.escape(str(missing))}.*allow_hub"):
        load_model(CONFIG, checkpoint=missing)
    with pytest.raises(WeightsError, match="not found: runwayml/stable-diffusion-v1-5"):  # no network touched
        load_model(CONFIG, base="runwayml/stable-diffusion-v1-5", checkpoint=path)
    with pytest.raises(WeightsError, match="is a folder"):
        load_model(CONFIG, checkpoint=tmp_path)
    torch.save({"state_dict": {"step": 3}}, tmp_path / "model_state-8.th")
    with pytest.raises(WeightsError, match="not tensors"):
        load_model(CONFIG, checkpoint=tmp_path / "model_state-8.th")


# -- SD1.5 bases ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def diffusers_base(tmp_path_factory):
    """A tiny SD1.5 in the diffusers folder layout, saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("sd15-diffusers")
    torch.manual_seed(11)
    modules = {
        "unet": UNet2DConditionModel(**CONFIG.unet_kwargs()),
        "vae": AutoencoderKL(**CONFIG.vae_kwargs()),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**CONFIG.text_kwargs())),
    }
    with torch.no_grad():  # diffusers zero-initialises a few layers: make every tensor tell
        for p in modules["unet"].parameters():
            p.add_(0.01 * torch.randn_like(p))
    for name, module in modules.items():
        module.save_pretrained(folder / name)
    return folder, modules


def test_diffusers_folder_base_with_the_checkpoints_own_parts(released, diffusers_base, tmp_path, caplog):
    folder, modules = diffusers_base
    # A checkpoint with only what X-Portrait trains beyond SD, and no reference net: the base
    # gives the UNet, VAE and text, and the reference net starts as the UNet.
    partial = released_state_dict(CONFIG, parts=("motion", "pose", "local"), seed=4)
    path = write_checkpoint(tmp_path / "model_state-parts.th", partial)
    with caplog.at_level(logging.WARNING, logger="engines.xportrait.weights.load"):
        model = load_model(CONFIG, base=folder, checkpoint=path)
    assert "reference net is a copy of the base UNet" in caplog.text
    unet = modules["unet"].state_dict()
    assert_module_equals(model.unet.unet, unet, "unet")
    reference = {k: v for k, v in unet.items() if not k.startswith(("conv_out", "conv_norm_out"))}
    assert_module_equals(model.reference_net.unet, reference, "reference")
    assert_module_equals(model.vae, modules["vae"].state_dict(), "vae")
    assert_module_equals(model.pose_controlnet, convert_controlnet_checkpoint(
        sub(partial, "pose_control_model."), model.pose_controlnet.config), "pose")
    torch.testing.assert_close(model.text, clip_embedding(modules["text_encoder"].state_dict()), rtol=0, atol=0)

    # The base alone leaves X-Portrait's own modules empty: refused, listing them.
    with pytest.raises(WeightsError) as e:
        load_model(CONFIG, base=folder)
    summary = re.search(r"no weights for 1220 of the model's \d+ tensors \(([^)]*)\)", str(e.value))
    assert summary and set(summary[1].split(", ")) == {
        "unet.motion 540/540", "pose_controlnet 340/340", "local_controlnet 340/340"}


def test_single_file_base(released, tmp_path):
    _, sd, _ = released
    single = released_state_dict(CONFIG, parts=SD_PARTS, seed=7)
    single["model_ema.decay"] = torch.tensor(0.9999)  # training files carry these; not weights we use
    file = tmp_path / "v1-5-tiny.safetensors"
    save_file(single, str(file))
    x_portrait = {k: v for k, v in sd.items() if "_motion_module." in k or k.startswith(
        ("appearance_control_model.", "pose_control_model.", "local_pose_control_model."))}
    path = write_checkpoint(tmp_path / "model_state-xp.th", x_portrait)
    model = load_model(CONFIG, base=file, checkpoint=path)
    assert_module_equals(model.unet.unet, convert_ldm_unet_checkpoint(single, model.unet.unet.config), "unet")
    assert_module_equals(model.vae, convert_ldm_vae_checkpoint(single, model.vae.config), "vae")
    appearance = sub(sd, "appearance_control_model.", "model.diffusion_model.", skip="input_hint_block")
    assert_module_equals(model.reference_net.unet,  # the checkpoint's reference net replaces the base's copy
                         convert_ldm_unet_checkpoint(appearance, model.reference_net.unet.config), "reference")
    torch.testing.assert_close(model.text, clip_embedding(sub(single, "cond_stage_model.transformer.")),
                               rtol=0, atol=0)
    assert torch.equal(single["alphas_cumprod"], ddpm_buffers(CONFIG)["alphas_cumprod"])


# -- LoRA ----------------------------------------------------------------------------------------

def kohya_name(module_path: str) -> str:
    return "lora_unet_" + module_path.replace(".", "_")


def lora_pair(weight: torch.Tensor, rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya shapes: down (rank, in, k, k) / (rank, in); up (out, rank, 1, 1) / (out, rank)."""
    out_ch, in_ch = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    down = torch.randn(rank, in_ch, *kernel, generator=g)
    up = torch.randn(out_ch, rank, *(1,) * len(kernel), generator=g)
    return down, up


def expected_fused(weight: torch.Tensor, down, up, alpha: float, scale: float) -> torch.Tensor:
    rank = down.shape[0]
    return weight + ((up.flatten(1) @ down.flatten(1)) * (scale * alpha / rank)).reshape(weight.shape)


def test_lora_fuses_linear_and_conv_layers_exactly(tmp_path):
    torch.manual_seed(3)
    unet = UNet2DConditionModel(**CONFIG.unet_kwargs())
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    g = torch.Generator().manual_seed(9)
    layers = {  # module -> (rank, alpha)
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (4, 2.0),  # linear
        "down_blocks.1.resnets.0.conv1": (2, 1.0),  # 3x3 conv
        "up_blocks.3.attentions.2.proj_in": (4, 4.0),  # 1x1 conv
        "mid_block.attentions.0.transformer_blocks.0.ff.net.2": (3, None),  # PEFT format, alpha = rank
    }
    kohya, peft, pairs = {}, {}, {}
    for name, (rank, alpha) in layers.items():
        down, up = lora_pair(before[name + ".weight"], rank, g)
        pairs[name] = (down, up, alpha if alpha is not None else float(rank))
        if alpha is None:
            peft[f"unet.{name}.lora_A.weight"], peft[f"unet.{name}.lora_B.weight"] = down, up
        else:
            kohya[kohya_name(name) + ".lora_down.weight"] = down
            kohya[kohya_name(name) + ".lora_up.weight"] = up
            kohya[kohya_name(name) + ".alpha"] = torch.tensor(alpha)
    save_file(kohya, str(tmp_path / "lcm-lora.safetensors"))
    save_file(peft, str(tmp_path / "peft-lora.safetensors"))

    assert fuse_lora(unet, tmp_path / "lcm-lora.safetensors", scale=0.5) == 3
    assert fuse_lora(unet, tmp_path / "peft-lora.safetensors", scale=0.5) == 1
    after = unet.state_dict()
    for name, (down, up, alpha) in pairs.items():
        key = name + ".weight"
        assert torch.equal(after[key], expected_fused(before[key], down, up, alpha, 0.5)), name
        assert not torch.equal(after[key], before[key])
    untouched = [k for k in before if k[: -len(".weight")] not in layers]
    assert all(torch.equal(after[k], before[k]) for k in untouched)


def test_a_lora_key_that_names_no_layer_changes_nothing(tmp_path):
    torch.manual_seed(3)
    unet = UNet2DConditionModel(**CONFIG.unet_kwargs())
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    good = "down_blocks.0.attentions.0.proj_out"
    down, up = lora_pair(before[good + ".weight"], 2, g)
    lora = {kohya_name(good) + ".lora_down.weight": down, kohya_name(good) + ".lora_up.weight": up,
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn9_to_q.lora_down.weight": down.clone(),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": up.clone()}
    save_file(lora, str(tmp_path / "odd.safetensors"))
    with pytest.raises(WeightsError) as e:
        fuse_lora(unet, tmp_path / "odd.safetensors")
    assert "attn9_to_q" in str(e.value) and "lora_te_text_model" in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    wrong = {kohya_name(good) + ".lora_down.weight": down, kohya_name(good) + ".lora_up.weight": up[:3]}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(WeightsError, match=re.escape(f"{good}: down [2, 16, 1, 1] and up [3, 2, 1, 1]")):
        fuse_lora(unet, tmp_path / "wrong.safetensors")


def test_load_model_fuses_lcm_lora_into_the_unet_only(released, tmp_path):
    path, _, model = released
    name = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v"
    weight = model.unet.unet.state_dict()[name + ".weight"]
    down, up = lora_pair(weight, 4, torch.Generator().manual_seed(1))
    save_file({kohya_name(name) + ".lora_down.weight": down, kohya_name(name) + ".lora_up.weight": up,
               kohya_name(name) + ".alpha": torch.tensor(8.0)}, str(tmp_path / "lcm.safetensors"))
    fused = load_model(CONFIG, checkpoint=path, lcm_lora=tmp_path / "lcm.safetensors")
    assert torch.equal(fused.unet.unet.state_dict()[name + ".weight"], expected_fused(weight, down, up, 8.0, 1.0))
    assert torch.equal(fused.reference_net.unet.state_dict()[name + ".weight"],
                       model.reference_net.unet.state_dict()[name + ".weight"])


def test_every_weights_path_is_found_before_anything_is_built_or_read(released, tmp_path, monkeypatch):
    """A mistyped --lcm-lora (or base, or checkpoint) is refused at once: not after the model
    was built and the other files read (minutes for SD1.5)."""
    from engines.xportrait.weights import load as loading

    path, _, _ = released

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before every path was found")

    monkeypatch.setattr(loading, "expected_tensors", no_build)
    monkeypatch.setattr(loading, "random_model", no_build)
    monkeypatch.setattr(loading, "read_state_dict", no_build)
    missing = tmp_path / "lcm-lora-typo.safetensors"
    with pytest.raises(WeightsError, match=f"LCM-LoRA not found: {re.escape(str(missing))}"):
        load_model(CONFIG, checkpoint=path, lcm_lora=missing)
    with pytest.raises(WeightsError, match="LCM-LoRA not found"):
        load_model(CONFIG, random_weights=True, lcm_lora=missing)
    with pytest.raises(WeightsError, match="base not found"):  # the first missing file is named first
        load_model(CONFIG, base=tmp_path / "sd15", checkpoint=tmp_path / "nowhere.th", lcm_lora=missing)
