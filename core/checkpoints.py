"""Every checkpoint freetumor reads: its own folders, and the authors' released ``.pt`` files.

freetumor writes safetensors with a JSON description (``model.json`` for segmentors, ``generator.json``
for generators). The authors' files (DESIGN §6) are torch pickles; they are read with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers, so no code in
a downloaded file ever runs. Their keys are mapped strictly: ``module.`` and ``backbone.`` prefixes are
dropped and ``swin_vit`` is renamed ``swinViT``; a key that still does not fit is an error naming it.

- ``baseline/model_baseline_segmentor.pt`` and ``baseline/model_covid_voco160k.pt``:
  ``{"epoch", "best_acc", "state_dict"}`` of a SwinUNETR v2 (feature 48), 7 classes (abdomen) or 2
  (chest: background and lesion; the lung is background to it) (:func:`import_segmentor`).
- ``baseline/TGAN.pt``: ``{"epoch", "state_dict"}`` with ``netG.*`` and ``netD.*`` (the Models-Genesis
  UNet3D, ``out_tr.final_conv``) and ``netSeg.*``, a full 7-class baseline (:func:`import_tgan`). Only
  the generator's output channel 0 was ever trained, so every organ uses it; its batch norm normalises
  with the statistics of what it is given, and the original gives it one crop at a time, so each crop is
  normalised on its own statistics. FreeTumor-Chest's file has a 1-output generator and a 2-output
  ``netSeg`` (background, lesion).
- ``pretrained/VoCo_B_SSL_head.pt``: a flat state dict of the SwinUNETR encoder, no decoder
  (:func:`initialize_from`: shape-matching keys are copied).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from freetumor_cli import __version__
from freetumor_cli.core import PathLike
from freetumor_cli.core.errors import InputError
from freetumor_cli.core.models import ModelConfig, build_model
from freetumor_cli.core.outputs import write_safetensors, write_text_atomic
from freetumor_cli.core.preprocess import Preprocessing
from freetumor_cli.core.registry import ORGANS, REGIONS, TASKS, generator_channels, region_organs

if TYPE_CHECKING:
    import torch

    from freetumor_cli.core.gan import GanConfig


WRAPPERS = ("state_dict", "network_weights", "net", "model", "student")


def read_torch_file(path: PathLike) -> Any:
    """A ``.pt``/``.pth`` file's content, loaded with ``weights_only=True`` (no pickled code runs)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint file not found: {path}")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        raise InputError(
            f"cannot load {path} safely (weights only): {str(exc).splitlines()[0]}",
            hint="only tensors and plain containers are read from checkpoint files; no code in them runs",
        ) from exc


def read_safetensors(path: PathLike, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file's tensors (on the CPU); a damaged or truncated file is a one-line error."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise InputError(f"{what} file not found: {path}") from None
    except Exception as exc:  # safetensors raises its own error types for damaged files
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"the {what} {path} is damaged or truncated ({detail})",
            hint="copy it again, or use another checkpoint (checkpoints/last, a saved best)",
        ) from None


def state_dict_of(raw: Any, path: Any) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint (inside a ``state_dict``/``network_weights``/``net`` wrapper or flat),
    with ``module.``/``backbone.`` prefixes dropped and ``swin_vit`` renamed ``swinViT``."""
    import torch

    state = raw
    if isinstance(raw, Mapping):
        for key in WRAPPERS:
            if isinstance(raw.get(key), Mapping):
                state = raw[key]
                break
    if not isinstance(state, Mapping) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path} holds no state dict of tensors")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        name = str(key)
        for prefix in ("module.", "backbone."):
            while name.startswith(prefix):
                name = name[len(prefix) :]
        out[name.replace("swin_vit.", "swinViT.")] = value
    return out


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: Any, what: str) -> None:
    """``module.load_state_dict(state, strict=True)``, with an error naming the first key that does not fit."""
    own = module.state_dict()
    for key, value in own.items():
        if key not in state:
            raise InputError(f"{source}: {what} lacks the key {key!r} of freetumor's layout")
        if tuple(state[key].shape) != tuple(value.shape):
            raise InputError(
                f"{source}: {what} key {key!r} has shape {list(state[key].shape)}, freetumor's layout {list(value.shape)}"
            )
    extra = sorted(set(state) - set(own))
    if extra:
        raise InputError(f"{source}: {what} holds the key {extra[0]!r}, which freetumor's layout does not have")
    module.load_state_dict(dict(state), strict=True)


def _read_card(path: Path, build: Callable[[dict[str, Any]], Any], *, hint: str) -> tuple[dict[str, Any], Any]:
    """A checkpoint's JSON description and what ``build`` makes of it; a damaged one is a one-line error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data, build(data)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise InputError(f"{path} is damaged or not freetumor's ({type(exc).__name__}: {exc})", hint=hint) from None


# Segmentors -------------------------------------------------------------------------------------


def _model_config(data: Mapping[str, Any]) -> ModelConfig:
    """The network of a ``model.json``: this version's (``preprocessing`` nested) or an earlier one's
    (``region``, ``spacing_mm`` and ``window_hu`` flat, the region's orientation)."""
    raw = dict(data["model"])
    if "preprocessing" in raw:
        preprocessing = Preprocessing.from_json(raw.pop("preprocessing"))
    else:
        preprocessing = Preprocessing.for_region(
            raw.pop("region"), spacing_mm=raw.pop("spacing_mm"), window_hu=raw.pop("window_hu")
        )
    return ModelConfig(**{**raw, "roi": tuple(raw["roi"]), "preprocessing": preprocessing})


def save_checkpoint(model: Any, config: ModelConfig, folder: PathLike, *, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into ``folder`` (each atomically)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_safetensors(state, out / "model.safetensors")
    meta = {"model": asdict(config), **(extra or {})}
    write_text_atomic(out / "model.json", json.dumps(meta, indent=2) + "\n")
    return out


def load_checkpoint(folder: PathLike, *, device: str = "cpu") -> tuple[Any, ModelConfig, dict[str, Any]]:
    """Rebuild the network of a checkpoint: a freetumor folder (safetensors), or one of the authors'
    released SwinUNETR ``.pt`` baselines (read with ``weights_only``). No pickled code ever runs."""
    path = Path(folder)
    if path.is_file() and path.suffix in (".pt", ".pth"):
        model, config = import_segmentor(path)
        return model.to(device), config, {"model": asdict(config), "source": str(path)}
    if path.is_file() and path.name in ("model.safetensors", "model.json"):
        path = path.parent
    if not (path / "model.json").is_file() or not (path / "model.safetensors").is_file():
        raise InputError(
            f"not a freetumor checkpoint: {path}",
            hint="expected a folder with model.safetensors and model.json (train-seg's checkpoints/best), or a .pt baseline",
        )
    meta, config = _read_card(path / "model.json", _model_config, hint="use a checkpoint folder written by train-seg")
    model = build_model(config)
    load_strict(model, read_safetensors(path / "model.safetensors"), path, "the checkpoint")
    return model.to(device), config, meta


def _segmentor_task(out_channels: int, path: Path, task: str | None) -> str:
    if task is not None:
        return task
    if "covid" in path.name.lower() and "covid" in TASKS:
        return "covid"
    abdomen = [
        t for t in TASKS.values() if t.region == "abdomen" and t.remap is None and t.out_channels == out_channels
    ]
    if abdomen:
        return abdomen[0].name
    raise InputError(
        f"{path} predicts {out_channels} classes: say which task it is",
        hint="convert it once: freetumor fetch-weights --convert FILE --task TASK --out DIR",
    )


def released_labels(task_name: str, out_channels: int, source: Any) -> dict[int, str]:
    """What each output channel of a released segmentor of ``task_name`` predicts: all the task's classes,
    or, with one channel per organ besides background, only its tumors (the authors' COVID-19 baseline,
    ``model_covid_voco160k.pt``: 0 background, 1 lesion).

    Raises:
        InputError: ``out_channels`` fits neither.
    """
    task = TASKS[task_name]
    for labels in (task.labels, task.tumor_labels):
        if len(labels) == out_channels:
            return labels
    raise InputError(
        f"{source} predicts {out_channels} classes; a {task_name} network predicts {task.out_channels} "
        f"({', '.join(task.labels.values())}) or {len(task.tumor_labels)} ({', '.join(task.tumor_labels.values())})",
        hint="pass the task the network was trained for (--task)",
    )


def import_segmentor(path: PathLike, *, task: str | None = None) -> tuple[Any, ModelConfig]:
    """A SwinUNETR v2 baseline of the authors (``{"state_dict": ...}``) as a freetumor network.

    The class count comes from ``out.conv.conv.weight``: 7 is the abdomen generalist (``all``); a file
    named like ``*covid*`` is the chest's (``covid``; the released one predicts background and lesion);
    otherwise pass ``task``.
    """
    path = Path(path)
    state = state_dict_of(read_torch_file(path), path)
    weight = state.get("out.conv.conv.weight")
    if weight is None:
        raise InputError(
            f"{path} holds no SwinUNETR output layer (out.conv.conv.weight)",
            hint="is it a VoCo backbone? use it with --init",
        )
    task_name = _segmentor_task(int(weight.shape[0]), path, task)
    config = swinunetr_config(state, task_name, released_labels(task_name, int(weight.shape[0]), path))
    model = build_model(config)
    load_strict(model, state, path, "the segmentor")
    return model, config


def swinunetr_config(state: Mapping[str, Any], task: str, labels: Mapping[int, str] | None = None) -> ModelConfig:
    """The configuration of a SwinUNETR v2 of ``task`` with the width of ``state``, at the region's
    preprocessing; ``labels`` (channel -> class) are the task's unless given."""
    t, region = TASKS[task], REGIONS[TASKS[task].region]
    classes = dict(labels) if labels is not None else t.labels
    embed = state.get("swinViT.patch_embed.proj.weight")
    return ModelConfig(
        name="swinunetr", out_channels=len(classes), roi=region.roi, task=task,
        preprocessing=Preprocessing.for_region(t.region), labels={str(k): v for k, v in classes.items()},
        feature_size=int(embed.shape[0]) if embed is not None else 48,
    )  # fmt: skip


# Generators -------------------------------------------------------------------------------------


def save_generator(
    generator: Any,
    gan: Any,
    folder: PathLike,
    *,
    preprocessing: Preprocessing,
    roi: Any,
    organ_channels: Mapping[str, int],
    discriminator: Any = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``generator.safetensors`` (and ``discriminator.safetensors``) and ``generator.json``.

    ``preprocessing`` is that of the crops it was trained on (its region is ``gan``'s). ``organ_channels``
    names the organs whose channel was trained, and the channel each uses: using any other organ with this
    generator is an error.
    """
    if preprocessing.region != gan.region:
        raise ValueError(f"a {gan.region} generator trained on {preprocessing.region} crops")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, module in (("generator", generator), ("discriminator", discriminator)):
        if module is None:
            continue
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        write_safetensors(state, out / f"{name}.safetensors")
    card = GeneratorCard(
        preprocessing, gan.base_channels, gan.adversarial_weight, gan.batch_stats,
        tuple(int(v) for v in roi), dict(organ_channels), {"version": __version__, **(extra or {})},  # type: ignore[arg-type]
    )  # fmt: skip
    write_text_atomic(out / "generator.json", json.dumps(card.to_json(), indent=2) + "\n")
    return out


def trained_channels(task_name: str) -> dict[str, int]:
    """The generator channels a run on ``task_name`` trains: one per organ of the task."""
    return {o: ORGANS[o].generator_channel for o in TASKS[task_name].organs}


@dataclass(frozen=True)
class GeneratorCard:
    """What a generator checkpoint says about its network (``generator.json``), typed.

    Attributes:
        preprocessing: the chain of the crops it was trained on; its region is the generator's (its output
            squashing and channels).
        base_channels: the network's width.
        adversarial_weight: λ of its training.
        batch_stats: each crop normalised on its own statistics (``GanConfig.batch_stats``); False for
            files written before it was recorded (``BatchNorm3d``).
        roi: crop size in voxels.
        organ_channels: organ -> the output channel trained for it; empty in files written before it was
            recorded (the region's generalist task's channels, :meth:`channels`).
        extra: anything else the file records (``version``, ``source``, ``released``, ``critic``, ``init``,
            ``hu_contrast``, ...), kept as written.
    """

    preprocessing: Preprocessing
    base_channels: int
    adversarial_weight: float
    batch_stats: bool
    roi: tuple[int, int, int]
    organ_channels: Mapping[str, int] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GeneratorCard:
        """The card of a ``generator.json`` of this version or an earlier one."""
        gan = data["generator"]
        known = {"generator", "spacing_mm", "window_hu", "orientation", "roi", "organ_channels"}
        preprocessing = Preprocessing.for_region(  # flat in generator.json, beside the network's sizes
            str(gan["region"]), spacing_mm=data["spacing_mm"], window_hu=data["window_hu"],
            orientation=data.get("orientation"),  # the region's in files written before it was recorded
        )  # fmt: skip
        return cls(
            preprocessing=preprocessing, base_channels=int(gan["base_channels"]),
            adversarial_weight=float(gan["adversarial_weight"]), batch_stats=bool(gan.get("batch_stats", False)),
            roi=tuple(int(r) for r in data["roi"]),  # type: ignore[arg-type]
            organ_channels={str(k): int(v) for k, v in (data.get("organ_channels") or {}).items()},
            extra={k: v for k, v in data.items() if k not in known},
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """The ``generator.json`` content (the layout every version reads)."""
        return {
            "generator": {
                "region": self.region, "base_channels": self.base_channels,
                "adversarial_weight": self.adversarial_weight, "batch_stats": self.batch_stats,
            },
            "spacing_mm": list(self.preprocessing.spacing_mm), "window_hu": list(self.preprocessing.window_hu),
            "orientation": self.preprocessing.orientation, "roi": list(self.roi),
            "organ_channels": dict(self.organ_channels), **self.extra,
        }  # fmt: skip

    @property
    def region(self) -> str:
        """The region it was trained for."""
        return self.preprocessing.region

    def gan(self) -> GanConfig:
        """The network's sizes."""
        from freetumor_cli.core.gan import GanConfig

        return GanConfig(self.region, self.base_channels, self.adversarial_weight, self.batch_stats)

    def channels(self) -> dict[str, int]:
        """Organ -> the output channel trained for it."""
        return dict(self.organ_channels) or trained_channels(REGIONS[self.region].generalist_task)


@dataclass
class Generator:
    """A generator ready to use, with what it was trained for.

    Attributes:
        module: the network (eval mode).
        card: what its ``generator.json`` says.
        discriminator_state: the discriminator's weights when the checkpoint holds them (to fine-tune).
        critic: the segmentor the checkpoint carries (the authors' ``netSeg``), with its config, or None.
    """

    module: Any
    card: GeneratorCard
    discriminator_state: dict[str, Any] | None = None
    critic: tuple[Any, ModelConfig] | None = None

    @property
    def region(self) -> str:
        return self.card.region

    @property
    def meta(self) -> dict[str, Any]:
        """The card as ``generator.json`` holds it (for code that reads it key by key)."""
        return self.card.to_json()

    def channel(self, organ: str) -> int:
        """The output channel the generator was trained to use for ``organ``.

        Raises:
            InputError: that organ's channel was never trained.
        """
        channels = self.card.channels()
        if organ not in channels:
            raise InputError(
                f"this generator was trained for {', '.join(channels) or 'no organ'} tumors, not {organ}",
                hint="train one with a critic that segments that organ (train-synth --baseline)",
            )
        return int(channels[organ])


def load_generator(path: PathLike, *, device: str = "cpu") -> Generator:
    """A generator: a ``train-synth`` checkpoint folder (or a fetch-weights conversion), or ``TGAN.pt``.

    Nothing is unpickled: folders hold safetensors, and ``.pt`` files are read with ``weights_only``.
    """
    from freetumor_cli.core.gan import make_generator

    path = Path(path)
    if path.is_file() and path.suffix in (".pt", ".pth"):
        return import_tgan(path, device=device)
    if not (path / "generator.json").is_file() or not (path / "generator.safetensors").is_file():
        raise InputError(
            f"not a freetumor generator checkpoint: {path}",
            hint="expected generator.safetensors and generator.json (train-synth's checkpoints/best), or TGAN.pt",
        )
    _, card = _read_card(
        path / "generator.json", GeneratorCard.from_json, hint="use a checkpoint folder written by train-synth"
    )
    generator = make_generator(card.gan())
    load_strict(generator, read_safetensors(path / "generator.safetensors", "generator"), path, "the generator")
    disc = path / "discriminator.safetensors"
    disc_state = read_safetensors(disc, "discriminator") if disc.is_file() else None
    critic = None
    if (path / "critic" / "model.json").is_file():
        model, config, _ = load_checkpoint(path / "critic", device=device)
        critic = (model, config)
    return Generator(generator.to(device).eval(), card, disc_state, critic)


def import_tgan(path: PathLike, *, device: str = "cpu") -> Generator:
    """The authors' ``TGAN.pt``: the generator (``netG.*``), the discriminator (``netD.*``) and, when the
    file holds it, the region's baseline (``netSeg.*``) that the original uses for quality control.

    The released generator's batch norm normalises each crop on its own statistics (as the original runs
    it, one crop at a time), and only its channel 0 was trained (the original translated every label to 1
    before picking the channel): every organ uses it.
    """
    from freetumor_cli.core.gan import GanConfig, make_discriminator, make_generator

    path = Path(path)
    raw = read_torch_file(path)
    state = state_dict_of(raw, path)
    parts = {
        p: {k[len(p) + 1 :]: v for k, v in state.items() if k.startswith(p + ".")} for p in ("netG", "netD", "netSeg")
    }
    weights = {_released_unet_key(k): v for k, v in parts["netG"].items()}
    if "down_tr64.ops.0.conv1.weight" not in weights or "out_tr.weight" not in weights:
        raise InputError(f"{path} holds no netG.* generator weights in the Models-Genesis UNet3D layout")
    out_channels = int(weights["out_tr.weight"].shape[0])
    base = int(weights["down_tr64.ops.0.conv1.weight"].shape[0])
    regions = [name for name in REGIONS if generator_channels(name) == out_channels]
    if not regions:
        raise InputError(f"{path}: a generator with {out_channels} output channels fits no region")
    region = regions[0]
    gan = GanConfig(
        region=region, base_channels=base, adversarial_weight=REGIONS[region].adversarial_weight, batch_stats=True
    )
    generator = make_generator(gan)
    load_strict(generator, weights, path, "netG")
    disc_state = None
    if parts["netD"]:
        discriminator = make_discriminator(gan)
        load_strict(discriminator, {_released_unet_key(k): v for k, v in parts["netD"].items()}, path, "netD")
        disc_state = discriminator.state_dict()
    critic = None
    if parts["netSeg"]:
        critic = _import_critic({_released_unet_key(k): v for k, v in parts["netSeg"].items()}, path, region, device)
    card = GeneratorCard(
        Preprocessing.for_region(region), gan.base_channels, gan.adversarial_weight, gan.batch_stats,
        REGIONS[region].roi, {o.name: 0 for o in region_organs(region)}, {"source": str(path), "released": True},
    )  # fmt: skip
    return Generator(generator.to(device).eval(), card, disc_state, critic)


def _released_unet_key(key: str) -> str:
    while key.startswith("module."):  # a network wrapped in DataParallel inside the TGAN module
        key = key[len("module.") :]
    return key.replace("out_tr.final_conv.", "out_tr.")


def _import_critic(state: Mapping[str, Any], path: Path, region: str, device: str) -> tuple[Any, ModelConfig]:
    """``netSeg``: the region's baseline (7 classes abdomen; the chest's predicts background and lesion)."""
    weight = state.get("out.conv.conv.weight")
    if weight is None:
        raise InputError(f"{path}: netSeg holds no SwinUNETR output layer")
    task = REGIONS[region].generalist_task
    config = swinunetr_config(state, task, released_labels(task, int(weight.shape[0]), f"{path}: netSeg"))
    model = build_model(config)
    load_strict(model, state, path, "netSeg")
    return model.to(device).eval(), config


# Initialisation ---------------------------------------------------------------------------------


@dataclass
class InitReport:
    """What :func:`initialize_from` copied."""

    source: str
    loaded: list[str] = field(default_factory=list)
    skipped_shape: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unused: int = 0

    def summary(self) -> str:
        return (
            f"initialised from {self.source}: {len(self.loaded)} tensors loaded, {len(self.skipped_shape)} skipped "
            f"(shape differs), {len(self.missing)} not in the file (kept as initialised), {self.unused} in the file unused"
        )


def initialize_from(model: Any, path: PathLike) -> InitReport:
    """Copy every tensor of a checkpoint whose name and shape match one of ``model``'s (the others keep
    their initialisation): VoCo's self-supervised encoder, a freetumor checkpoint folder, or any
    state dict file.

    Raises:
        InputError: nothing matches (the file is not a checkpoint of this network).
    """

    path = Path(path)
    if path.is_dir() or path.name in ("model.safetensors", "model.json"):
        folder = path if path.is_dir() else path.parent
        if not (folder / "model.safetensors").is_file():
            raise InputError(f"not a freetumor checkpoint: {folder}", hint="expected model.safetensors and model.json")
        state: dict[str, torch.Tensor] = read_safetensors(folder / "model.safetensors", "--init checkpoint")
    elif path.suffix == ".safetensors":
        state = read_safetensors(path, "--init checkpoint")
    else:
        state = state_dict_of(read_torch_file(path), path)
    own = model.state_dict()
    report = InitReport(str(path))
    merged = {}
    for key, value in own.items():
        if key in state and tuple(state[key].shape) == tuple(value.shape):
            merged[key] = state[key].to(value.dtype)
            report.loaded.append(key)
        else:
            merged[key] = value
            (report.skipped_shape if key in state else report.missing).append(key)
    report.unused = len(set(state) - set(own))
    if not report.loaded:
        raise InputError(
            f"{path}: no tensor matches this network's layout", hint="is it a checkpoint of the same architecture?"
        )
    model.load_state_dict(merged, strict=True)
    return report


def convert_released(path: PathLike, out: PathLike, *, task: str | None = None) -> Path:
    """Convert an authors' file once into freetumor's folders: a segmentor into ``model.safetensors`` +
    ``model.json``; ``TGAN.pt`` into a generator folder (with its discriminator, and its ``netSeg`` in
    ``critic/``)."""
    path, out_path = Path(path), Path(out)
    state = state_dict_of(read_torch_file(path), path)
    if any(k.startswith("netG.") for k in state):
        gen = import_tgan(path)
        card = gen.card
        save_generator(
            gen.module, card.gan(), out_path, preprocessing=card.preprocessing, roi=card.roi,
            organ_channels=card.organ_channels, discriminator=_as_module(gen), extra={"source": str(path), "released": True},
        )  # fmt: skip
        if gen.critic is not None:
            save_checkpoint(gen.critic[0], gen.critic[1], out_path / "critic", extra={"source": str(path)})
        return out_path
    model, config = import_segmentor(path, task=task)
    return save_checkpoint(model, config, out_path, extra={"source": str(path), "released": True})


def _as_module(gen: Generator) -> Any:
    if gen.discriminator_state is None:
        return None
    from freetumor_cli.core.gan import make_discriminator

    module = make_discriminator(gen.card.gan())
    module.load_state_dict(gen.discriminator_state)
    return module
