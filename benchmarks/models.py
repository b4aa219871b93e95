"""Models suite: images/s of whole backbones (inference, backbone training step, full EsViT step) and the
largest batch that fits on the GPU.

Models: Swin-T/S/B (W7, 224 px), EsViT's windowed CvT (``cvt_v4_s1``, Table 8; W7, no timm peer), ViL
(``vil_2262``, Table 8's; its sparse stages on ``neighborhood_window_attention``, backend triton / torch; no
timm peer) and the DeiT-S / ViT-B/16 / ResNet-50 baselines. Providers: our backbones
from ``esvit.models.create_backbone(name, window_size=7, img_size=224, backend=...)`` (forward(x) ->
(view_feat, region_tokens)) with backend triton / cuda / torch, timm's models (``forward_features``, never
pretrained weights), and timm's Swin patched onto our kernels (``patch_timm_swin``). ``esvit`` is written
in parallel and imported lazily: when it is missing, its providers are skipped with the reason.

Scopes: ``infer`` (eval, no grad, bf16 autocast: the paper's throughput metric); ``backbone_train`` (train
mode forward + backward of a mean-feature loss: the backbone's share of a training step); ``esvit_step``
(the full EsViT step -- multi-crop student/teacher forward, both losses, backward, optimiser and EMA --
through ``esvit.train.Trainer.train_step`` on synthetic 2 x global + 8 x local crops, per backend: the
``torch`` backend runs the eager window attention and losses); ``*_max_batch``: the largest
batch that runs, found by doubling until CUDA OOM then bisecting twice (GPU only; for our backbones and
timm's, not the patched timm models).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .harness import Record, Settings, Timer, classify_failure, free_memory, make_bench, module_available
from .suite import BUDGET_REASON, DTYPES, Case, Forward, Provider, RunContext, backend_check, run_cases

TIMM_NAMES = {
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "swin_small": "swin_small_patch4_window7_224",
    "swin_base": "swin_base_patch4_window7_224",
    "deit_small": "deit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "resnet50": "resnet50",
}
MAX_BATCH_CAP = {"infer": 16384, "backbone_train": 4096}


@dataclass
class ModelInputs:
    """A batch of images and how to run it (train or eval, autocast dtype)."""

    model: str
    img: int
    batch: int
    dtype: str
    train: bool
    device: torch.device
    x: torch.Tensor | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and self.dtype != "fp32":
            return torch.autocast("cuda", dtype=DTYPES[self.dtype])
        return contextlib.nullcontext()


def make_inputs(model: str, img: int, batch: int, dtype: str, train: bool, device: torch.device) -> ModelInputs:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 3, img, img, generator=g).to(device)
    return ModelInputs(model, img, batch, dtype, train, device, x)


def _features_loss(out: Any) -> torch.Tensor:
    """A scalar touching every output (view feature and region tokens, or timm's feature map)."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return sum(o.float().mean() for o in outs)


def _forward(model: torch.nn.Module, ins: ModelInputs, call: Callable[[torch.Tensor], Any]) -> Forward:
    model.train(ins.train)
    if ins.train:
        params = [p for p in model.parameters() if p.requires_grad]

        def train_fn() -> torch.Tensor:
            with ins.autocast():
                return _features_loss(call(ins.x))

        return Forward(train_fn, params)

    def infer_fn() -> Any:
        with torch.no_grad(), ins.autocast():
            return call(ins.x)

    return Forward(infer_fn)


# ------------------------------------------------------------------------------------------------ providers


def _esvit_check(backend: str | None) -> Callable[[ModelInputs, str], str | None]:
    def check(ins: ModelInputs, mode: str) -> str | None:
        why = module_available("esvit.models")
        if why:
            return why
        import esvit.models

        if not hasattr(esvit.models, "create_backbone"):
            return ("esvit.models has no create_backbone "
                    "(contract: create_backbone(name, *, window_size, img_size, backend))")
        return _backend_check(backend)(ins, mode) if backend else None

    return check


def _attention_op(model: str) -> str:
    """The fused attention op a model's backend drives."""
    return "neighborhood_window_attention" if model.startswith("vil") else "shifted_window_attention"


def _backend_check(backend: str) -> Callable[[ModelInputs, str], str | None]:
    kernels = {op: backend_check(backend, op, interpreter_modes=("fwd", "fwd+bwd", "step"))
               for op in ("shifted_window_attention", "neighborhood_window_attention")}

    def check(ins: ModelInputs, mode: str) -> str | None:
        why = kernels[_attention_op(ins.model)](ins, mode)
        if why is None and backend == "triton" and ins.device.type != "cuda":
            return "the Triton interpreter (CPU) is far too slow for whole models; triton models run on GPU"
        return why

    return check


def _esvit(backend: str):
    def build(ins: ModelInputs) -> Forward:
        from esvit.models import create_backbone

        model = create_backbone(ins.model, window_size=7, img_size=ins.img, backend=backend).to(ins.device)
        return _forward(model, ins, model)

    return build


def _timm(backend: str | None):
    def build(ins: ModelInputs) -> Forward:
        import timm

        from esvit_kernels import patch_timm_swin

        kw = {} if ins.img == 224 else {"img_size": ins.img}
        model = timm.create_model(TIMM_NAMES[ins.model], pretrained=False, **kw).to(ins.device)
        if backend:
            patch_timm_swin(model, backend=backend)
        return _forward(model, ins, model.forward_features)

    return build


def _esvit_step(backend: str):
    """One full EsViT training step per call: student on 2 global + 8 local crops, teacher on the globals,
    view + region losses, backward, AdamW, teacher EMA. ``backend`` drives the window attention; the
    losses run on Triton unless ``backend`` is "torch" (the cuda backend has no fused view loss)."""

    def build(ins: ModelInputs) -> Forward:
        from esvit.train import Trainer

        local = 96 if ins.img >= 224 else max(32, ins.img // 2)
        precision = "fp32" if ins.device.type != "cuda" else {"bf16": "bf16", "fp16": "fp16"}.get(ins.dtype, "fp32")
        cfg = {
            "model": {"arch": ins.model, "window_size": 7, "backend": backend},
            "loss": {"backend": "torch" if backend == "torch" else "auto"},
            "data": {"global_crop_size": ins.img, "local_crop_size": local, "local_crops_number": 8},
            "optim": {"batch_size": ins.batch},
            "train": {"precision": precision},
        }
        if ins.device.type != "cuda":  # CPU smoke pass: exercise the path, not K = 65536 heads on 2 cores
            cfg["head"] = {"out_dim": 4096, "hidden_dim": 512}
        trainer = Trainer(cfg, steps_per_epoch=10_000, device=ins.device)
        g = torch.Generator(device="cpu").manual_seed(0)
        crops = [torch.randn(ins.batch, 3, ins.img, ins.img, generator=g).to(ins.device) for _ in range(2)]
        crops += [torch.randn(ins.batch, 3, local, local, generator=g).to(ins.device) for _ in range(8)]
        return Forward(lambda: trainer.train_step(crops))

    return build


def _step_check(backend: str) -> Callable[[ModelInputs, str], str | None]:
    def check(ins: ModelInputs, mode: str) -> str | None:
        why = module_available("esvit.train")
        if why:
            return f"the EsViT training stack is not importable: {why}"
        if backend in ("triton", "cuda"):
            return _backend_check(backend)(ins, mode)
        return None

    return check


def providers(model: str, scope: str) -> list[Provider]:
    """The providers of one model and scope."""
    if scope == "esvit_step":
        backends = _backends(model) if _fused(model) else ("auto", "torch")
        return [Provider(f"esvit+{b}", "ours", _esvit_step(b), _step_check(b), note=f"full EsViT step, backend='{b}'")
                for b in backends]
    if model not in TIMM_NAMES:  # CvT, ViL: timm has neither; the peer is our model on the eager attention
        return [Provider(f"esvit+{b}", "ours" if b != "torch" else "peer", _esvit(b), _esvit_check(b),
                         note="" if b != "torch" else "eager attention (no timm peer)")
                for b in _backends(model)]
    if model.startswith("swin"):
        out = [Provider(f"esvit+{b}", "ours", _esvit(b), _esvit_check(b)) for b in _backends(model)]
        out += [Provider(f"timm+{b}", "ours", _timm(b), _backend_check(b),
                         note=f"timm model patched by patch_timm_swin(backend='{b}')") for b in ("triton", "cuda")]
    else:
        out = [Provider("esvit", "ours", _esvit("auto"), _esvit_check(None),
                        note="no window attention: backend='auto'")]
    return out + [Provider("timm", "peer", _timm(None), note=f"timm.create_model('{TIMM_NAMES[model]}')")]


def _fused(model: str) -> bool:
    """Whether the model runs a fused attention op (Swin, CvT, ViL): then one provider per backend."""
    return model.startswith(("swin", "cvt", "vil"))


def _backends(model: str) -> tuple[str, ...]:
    """The backends of a fused model: the neighbourhood op (ViL) has no cuda backend."""
    return ("triton", "torch") if model.startswith("vil") else ("triton", "cuda", "torch")


# ------------------------------------------------------------------------------------------------ plan


def plan(device: torch.device, quick: bool) -> tuple[list[str], int, int, str]:
    """(models, image size, fixed batch, dtype). The CPU smoke pass uses 64-px images (a path check)."""
    if device.type != "cuda":
        return ["swin_tiny", "cvt_v4_s1", "vil_2262", "deit_small"], 64, 2, "fp32"
    if quick:
        return ["swin_tiny", "deit_small"], 224, 32, "bf16"
    return ["swin_tiny", "swin_small", "swin_base", "cvt_v4_s1", "vil_2262", "deit_small", "vit_base",
            "resnet50"], 224, 128, "bf16"


def _post(records: list[Record], batch: int) -> list[Record]:
    for r in records:
        r.extra["batch"] = batch
        if r.status == "ok":
            r.extra["images_per_s"] = batch / (r.time_ms["median"] * 1e-3)
    return records


def _case(ctx: RunContext, model: str, scope: str, img: int, batch: int, dtype: str) -> Case:
    train = not scope.startswith("infer")
    return Case(suite="models", scope=scope, shape_name=f"{model}-{img}px", shape={"model": model, "img": img,
                "timm_name": TIMM_NAMES.get(model, "-"), "batch": batch}, dtype=dtype,
                modes={"backbone_train": ("fwd+bwd",), "esvit_step": ("step",)}.get(scope.removesuffix("_max_batch"),
                                                                                    ("fwd",)),
                make_inputs=lambda: make_inputs(model, img, batch, dtype, train, ctx.device),
                providers=ctx.select(providers(model, scope)))


def headline_step(ctx: RunContext) -> Iterator[list[Record]]:
    """gpu-check's headline: one full EsViT Swin-T training step (bf16, 224 + 96 px crops) at the paper's 32
    images per GPU, fused backends against torch (the smoke pass's 64-px batch of 2 on the CPU)."""
    _, img, batch, dtype = plan(ctx.device, True)
    img, batch, dtype = (224, 32, "bf16") if ctx.device.type == "cuda" else (img, batch, dtype)
    case = _case(ctx, "swin_tiny", "esvit_step", img, batch, dtype)
    for records in run_cases(iter([case]), ctx):
        yield _post(records, batch)


def run(ctx: RunContext) -> Iterator[list[Record]]:
    names, img, batch, dtype = plan(ctx.device, ctx.quick)
    dtype = ctx.dtypes[0] if ctx.dtypes else dtype
    names = [m for m in names if ctx.wants(m, dtype)]
    fixed = (_case(ctx, m, scope, img, batch, dtype) for scope in ("infer", "backbone_train", "esvit_step")
             for m in names)
    for records in run_cases(fixed, ctx):
        yield _post(records, batch)
    for scope in ("infer", "backbone_train"):
        for model in names:
            case = _case(ctx, model, f"{scope}_max_batch", img, batch, dtype)
            case.providers = [p for p in case.providers if p.name in MAX_BATCH_PROVIDERS]
            if case.providers and not ctx.is_done(case):
                ctx.log(f"models/{scope}_max_batch  {model}  {dtype}")
                yield max_batch(case, scope, ctx)


# ------------------------------------------------------------------------------------------------ max batch

MAX_BATCH_PROVIDERS = ("esvit+triton", "esvit+cuda", "esvit+torch", "esvit", "timm")


def max_batch(case: Case, scope: str, ctx: RunContext) -> list[Record]:
    """Largest batch each provider runs without CUDA OOM: double from the fixed batch, then bisect twice
    between the last batch that ran and the first that did not; time a few steps at the largest."""
    mode = case.modes[0]
    if ctx.device.type != "cuda":
        return [case.record(p, mode, "skipped", "GPU only: the largest batch is found by doubling until CUDA OOM")
                for p in case.providers]
    if ctx.out_of_time():
        return case.skipped(BUDGET_REASON)
    out = []
    for prov in case.providers:
        ins = make_inputs(case.shape["model"], case.shape["img"], 1, case.dtype, scope != "infer", ctx.device)
        reason = prov.check(ins, mode)
        if reason:
            out.append(case.record(prov, mode, "skipped", reason))
            continue
        try:
            out.append(_max_batch_one(case, prov, ins, mode, MAX_BATCH_CAP[scope]))
        except Exception as exc:
            out.append(case.record(prov, mode, *classify_failure(exc)))
        del ins
        free_memory()
    return out


def _fits(fwd: Forward, ins: ModelInputs, batch: int) -> bool:
    """One step at ``batch`` (the model is built once; only the input changes)."""
    ins.x = torch.randn(batch, 3, ins.img, ins.img, device=ins.device)
    try:
        out = fwd.fn()
        if ins.train:
            out.backward()
        torch.cuda.synchronize()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        out = ins.x = None  # noqa: F841 -- drop the activations before freeing
        for p in fwd.params:
            p.grad = None
        free_memory()


def _max_batch_one(case: Case, prov: Provider, ins: ModelInputs, mode: str, cap: int) -> Record:
    fwd = prov.build(ins)
    lo, hi = 0, case.shape["batch"]
    while hi <= cap and _fits(fwd, ins, hi):
        lo, hi = hi, hi * 2
    capped = hi > cap
    for _ in range(0 if capped or not lo else 2):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _fits(fwd, ins, mid) else (lo, mid)
    if lo == 0:
        return case.record(prov, mode, "oom", f"batch {hi} does not fit", extra={"max_batch": 0})
    ins.x = torch.randn(lo, 3, ins.img, ins.img, device=ins.device)
    timer = Timer(Settings(ins.device, warmup_ms=0.0, rep_ms=0.0, min_reps=3, max_reps=3))
    bench = make_bench(fwd.fn, fwd.params, mode)
    timing, mem = timer.time(bench), timer.peak_memory_mb(bench)
    return case.record(prov, mode, "ok", time_ms=timing, peak_mem_mb=mem,
                       extra={"max_batch": lo, "batch": lo, "capped": capped,
                              "images_per_s": lo / (timing["median"] * 1e-3)})
