"""DINO self-distillation pieces (Caron et al., ICCV 2021), shared by training code and benchmarks.

    student, teacher = build_dino("vit_small", patch_size=16, out_dim=65536)
    loss_fn = DINOLoss(65536, ncrops=12, warmup_teacher_temp=0.04, teacher_temp=0.04,
                       warmup_teacher_temp_epochs=0, nepochs=100)
    optimizer = torch.optim.AdamW(param_groups(student))
    step = DINOStep(student, teacher, loss_fn, optimizer, clip_grad=3.0, freeze_last_layer=1)
    loss = step(crops, epoch=0, teacher_momentum=0.996)      # crops: 2 global, then local

Nothing in a step reads a value back to the host: the loss, the gradient norms and the
centre stay on the device until the caller asks for them.
"""
import contextlib
import copy
import itertools
import math
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastvision.cuda_graphs import CaptureError, CapturedCall

Crops = Union[torch.Tensor, Sequence[torch.Tensor]]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


# --- head -------------------------------------------------------------------------------------

def _legacy_weight_norm_keys(state_dict, prefix, *args) -> None:
    """Load checkpoints written with torch.nn.utils.weight_norm (DINO's own: weight_g / weight_v)."""
    for old, new in (("weight_g", "original0"), ("weight_v", "original1")):
        key = prefix + old
        if key in state_dict:
            state_dict[f"{prefix}parametrizations.weight.{new}"] = state_dict.pop(key)


def weight_norm_linear(in_dim: int, out_dim: int) -> nn.Linear:
    """Linear without bias, weight = g · v / ||v|| per output row, g initialised to 1."""
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(in_dim, out_dim, bias=False))
    with torch.no_grad():
        layer.parametrizations.weight.original0.fill_(1.0)
    layer._register_load_state_dict_pre_hook(_legacy_weight_norm_keys)
    return layer


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DINOHead(nn.Module):
    """MLP (in → hidden → hidden → bottleneck, GELU), L2 normalisation, weight-normalised linear to out_dim."""

    def __init__(self, in_dim: int, out_dim: int = 65536, *, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(nlayers, 1) - 1) + [bottleneck_dim]
        layers: List[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:
                layers += [nn.BatchNorm1d(d_out)] if use_bn else []
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.apply(_init_linear)
        self.last_layer = weight_norm_linear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


# --- multi-crop -------------------------------------------------------------------------------

def resolution_groups(crops: Sequence[torch.Tensor]) -> List[List[torch.Tensor]]:
    """Consecutive crops of the same (H, W), in order: DINO runs one backbone pass per group."""
    return [list(group) for _, group in itertools.groupby(crops, key=lambda c: tuple(c.shape[-2:]))]


class MultiCropWrapper(nn.Module):
    """backbone + head over a list of crops, the head once over all the features (in crop order:
    crop 0 of every image, then crop 1, ...).

    Crops of several resolutions run through a patched timm ViT in one packed pass
    (``fastvision.packing``: every crop's tokens in one stream, block-diagonal attention), or as
    DINO does it, one backbone pass per run of same-resolution crops. ``packed``: None packs
    whenever ``fastvision.packing.can_pack(backbone)`` allows (checked at each forward: it depends
    on train()/eval()), True packs or raises an error that says why it cannot, False never packs.
    Crops of a single resolution are one backbone pass either way.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, packed: Optional[bool] = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.packed = packed

    def why_not_packed(self) -> Optional[str]:
        """Why crops of several resolutions would not run packed now (None: they would)."""
        if self.packed is False:
            return "packing switched off (packed=False)"
        from fastvision.packing import can_pack

        return can_pack(self.backbone)

    def _use_packing(self, groups: List[List[torch.Tensor]]) -> bool:
        if len(groups) < 2 or self.packed is False:  # a single resolution is one pass already
            return False
        reason = self.why_not_packed()
        if reason is not None and self.packed:
            raise ValueError(f"MultiCropWrapper(packed=True) cannot pack its backbone: {reason}")
        return reason is None

    def forward_backbone(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        groups = resolution_groups(crops)
        if self._use_packing(groups):
            from fastvision.packing import packed_features_checked  # _use_packing asked can_pack

            return packed_features_checked(self.backbone, [torch.cat(group) for group in groups], pre_logits=False)
        features = []
        for group in groups:
            out = self.backbone(torch.cat(group))
            features.append(out[0] if isinstance(out, tuple) else out)
        return torch.cat(features)

    def forward(self, crops: Crops) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        return self.head(self.forward_backbone(crops))


# --- loss -------------------------------------------------------------------------------------

def teacher_temperature_schedule(warmup_teacher_temp: float, teacher_temp: float, warmup_epochs: int,
                                 nepochs: int) -> List[float]:
    """Linear warm-up over ``warmup_epochs``, then constant (one value per epoch)."""
    warmup = [warmup_teacher_temp + (teacher_temp - warmup_teacher_temp) * i / max(warmup_epochs - 1, 1)
              for i in range(warmup_epochs)]
    return warmup + [teacher_temp] * max(nepochs - warmup_epochs, 0)


def _loss_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher distributions of the global crops and the
    student distributions of every other crop, averaged over the pairs; then the centre's EMA update.

    ``student_output``: (ncrops·B, K), crop-major; ``teacher_output``: (n_global·B, K).
    ``fused``: fastvision.ops.dino_loss (one pass over K per direction) where it can run (None),
    always (True: an error says why it cannot), or never (False: the eager code below).
    """

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, n_global_crops: int = 2, fused: Optional[bool] = None):
        super().__init__()
        self.fused = fused
        self.ncrops = ncrops
        self.n_global_crops = n_global_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        # Set by GraphedForwardBackward under torch.distributed: update_center only sums the batch into
        # pending_center_sum, and the all-reduce and EMA (apply_center_update) run after the graph replay.
        self.defer_center_update = False
        self.pending_center_sum: Optional[Tuple[torch.Tensor, int]] = None
        self.teacher_temp_schedule = teacher_temperature_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)

    def teacher_temp(self, epoch: int) -> float:
        return self.teacher_temp_schedule[min(epoch, len(self.teacher_temp_schedule) - 1)]

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        if self._runs_fused(student_output, teacher_output):
            from fastvision.ops.dino_loss import dino_loss

            loss = dino_loss(student_output, teacher_output, self.center, ncrops=self.ncrops,
                             student_temp=self.student_temp, teacher_temp=self.teacher_temp(epoch))
            self.update_center(teacher_output)
            return loss
        return self.eager_forward(student_output, teacher_output, epoch)

    def _runs_fused(self, student_output: torch.Tensor, teacher_output: torch.Tensor) -> bool:
        if self.fused is False:
            return False
        from fastvision.ops.dino_loss import dino_loss_decline

        reason = dino_loss_decline(student_output, teacher_output, self.center, ncrops=self.ncrops)
        if reason is not None and self.fused:
            raise ValueError(f"DINOLoss(fused=True) cannot run the fused loss: {reason}")
        return reason is None

    def eager_forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        dtype = _loss_dtype(student_output)
        log_p = F.log_softmax(student_output.to(dtype) / self.student_temp, dim=-1)
        log_p = log_p.view(self.ncrops, -1, log_p.shape[-1])
        q = F.softmax((teacher_output.detach().to(dtype) - self.center) / self.teacher_temp(epoch), dim=-1)
        q = q.chunk(self.n_global_crops)
        # Σ_i Σ_{v≠i} -q_i·log p_v = Σ_i -q_i·(Σ_v log p_v - log p_i): one product per teacher crop.
        sum_log_p = log_p.sum(0)
        total = sum(-(q_i * (sum_log_p - log_p[i])).sum(-1).mean() for i, q_i in enumerate(q))
        pairs = self.n_global_crops * (self.ncrops - 1)
        self.update_center(teacher_output)
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        # Summed in the centre's dtype as it is read: no float32 copy of the teacher output.
        batch_sum = teacher_output.sum(dim=0, keepdim=True, dtype=self.center.dtype)
        if self.defer_center_update:
            self.pending_center_sum = (batch_sum, teacher_output.shape[0])
            return
        self.apply_center_update(batch_sum, teacher_output.shape[0])

    @torch.no_grad()
    def apply_center_update(self, batch_sum: torch.Tensor, rows: int) -> None:
        """centre ← m·centre + (1 - m)·(batch_sum summed over processes) / (rows × processes)."""
        if _distributed():
            dist.all_reduce(batch_sum)
            rows *= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_sum, alpha=(1 - self.center_momentum) / rows)


# --- parameter updates without host syncs -----------------------------------------------------

def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel and torch.compile's wrapper."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher ← momentum · teacher + (1 - momentum) · student, parameter by parameter (in order)."""
    s_params = [p.detach() for p in unwrap(student).parameters()]
    t_params = [p.detach() for p in unwrap(teacher).parameters()]
    if len(s_params) != len(t_params):
        raise ValueError(f"student has {len(s_params)} parameters, teacher {len(t_params)}")
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)  # one pass: t + (1 - m)(s - t)


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> Optional[torch.Tensor]:
    """DINO's clipping: each parameter's gradient scaled to norm ≤ clip on its own. Returns the norms
    before clipping (one tensor, on the device) or None when no parameter has a gradient."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
    scales = (clip / (norms + 1e-6)).clamp_(max=1.0)
    torch._foreach_mul_(grads, [s.to(g.dtype) for s, g in zip(scales.unbind(0), grads)])
    return norms


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """Drop the head's last-layer gradients during the first ``freeze_last_layer`` epochs."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0.0) -> List[float]:
    """One value per iteration: linear warm-up from start_warmup_value, then cosine base → final."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = [start_warmup_value + (base_value - start_warmup_value) * i / max(warmup_iters - 1, 1)
              for i in range(warmup_iters)]
    n = epochs * niter_per_ep - warmup_iters
    cosine = [final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * i / n)) for i in range(n)]
    return warmup + cosine


def param_groups(model: nn.Module) -> List[dict]:
    """DINO's optimizer groups: no weight decay on biases and norm parameters (1-d tensors)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


# --- models -----------------------------------------------------------------------------------

def dino_vit(arch: str = "vit_small", patch_size: int = 16, *, img_size: int = 224, drop_path_rate: float = 0.1,
             **kwargs) -> nn.Module:
    """A timm ViT backbone returning the CLS feature at any input size (position embeddings interpolated).

    ``arch`` is a timm name ("vit_small_patch16_224") or a family ("vit_small", "vit_base") combined
    with ``patch_size``; extra keyword arguments (depth=..., embed_dim=...) go to timm.create_model.
    """
    import timm

    name = arch if "patch" in arch else f"{arch}_patch16_224"
    if "patch" not in arch:
        kwargs["patch_size"] = patch_size
    return timm.create_model(name, pretrained=False, dynamic_img_size=True, num_classes=0, img_size=img_size,
                             drop_path_rate=drop_path_rate, **kwargs)


def build_backbone(arch: str, patch_size: int = 16, *, drop_path_rate: float = 0.1, **kwargs) -> nn.Module:
    """dino_vit for "vit*"/"deit*" names, otherwise a timm model (e.g. resnet50) without classifier."""
    if arch.startswith(("vit", "deit")):
        return dino_vit(arch, patch_size, drop_path_rate=drop_path_rate, **kwargs)
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)


def build_dino(arch: str = "vit_small", patch_size: int = 16, out_dim: int = 65536, *,
               drop_path_rate: float = 0.1, norm_last_layer: bool = True, use_bn_in_head: bool = False,
               **backbone_kwargs) -> Tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student and teacher (same weights; teacher without drop-path and without gradients)."""
    def make(rate: float) -> MultiCropWrapper:
        backbone = build_backbone(arch, patch_size, drop_path_rate=rate, **backbone_kwargs)
        head = DINOHead(backbone.num_features, out_dim, use_bn=use_bn_in_head, norm_last_layer=norm_last_layer)
        return MultiCropWrapper(backbone, head)

    student = make(drop_path_rate)
    teacher = make(0.0) if drop_path_rate else copy.deepcopy(student)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher


# --- one training step ------------------------------------------------------------------------

def _device_type(crops: Sequence[torch.Tensor]) -> str:
    return crops[0].device.type


def forward_backward(student: nn.Module, teacher: nn.Module, loss_fn: DINOLoss, crops: Sequence[torch.Tensor],
                     epoch: int, *, clip_grad: float = 3.0, autocast_dtype: Optional[torch.dtype] = None,
                     backward: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
    """Teacher on the global crops, student on all crops, loss, backward, gradient clipping.

    Gradients are written into ``.grad`` (accumulated: the caller zeroes them first), or wherever
    ``backward(loss)`` puts them when given. Returns the loss, detached, on the device.
    """
    crops = list(crops)
    # Without autocast_dtype, a torch.autocast the caller entered still applies.
    precision = (torch.autocast(_device_type(crops), dtype=autocast_dtype) if autocast_dtype is not None
                 else contextlib.nullcontext())
    with precision:
        with torch.no_grad():
            teacher_output = teacher(crops[:loss_fn.n_global_crops])
        student_output = student(crops)
    loss = loss_fn(student_output, teacher_output, epoch)
    if backward is None:
        loss.backward()
    else:
        backward(loss)
    if clip_grad:
        clip_gradients(student, clip_grad)
    return loss.detach()


def apply_update(student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                 teacher_momentum: float, *, freeze_last_layer: int = 1) -> None:
    """Last-layer freeze, optimizer step, EMA teacher update."""
    cancel_gradients_last_layer(epoch, student, freeze_last_layer)
    optimizer.step()
    ema_update(student, teacher, teacher_momentum)


def dino_train_step(student: nn.Module, teacher: nn.Module, loss_fn: DINOLoss, optimizer: torch.optim.Optimizer,
                    crops: Sequence[torch.Tensor], epoch: int, teacher_momentum: float, *,
                    clip_grad: float = 3.0, freeze_last_layer: int = 1,
                    autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Teacher on the global crops, student on all crops, loss, backward, clip, freeze, step, EMA.

    Returns the loss (detached, on the device: no host sync). ``autocast_dtype`` (e.g.
    torch.bfloat16) runs both forwards under torch.autocast (as does calling the step inside
    a torch.autocast block); the loss is computed in fp32.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = forward_backward(student, teacher, loss_fn, crops, epoch, clip_grad=clip_grad,
                            autocast_dtype=autocast_dtype)
    apply_update(student, teacher, optimizer, epoch, teacher_momentum, freeze_last_layer=freeze_last_layer)
    return loss


def why_not_graphed(student: nn.Module, crops: Sequence[torch.Tensor]) -> Optional[str]:
    """Why a DINO step cannot replay its forward and backward from a CUDA graph (None when it can)."""
    if not crops or any(c.device.type != "cuda" for c in crops):
        return "CUDA graphs need the crops on a CUDA device"
    if isinstance(student, nn.DataParallel):
        return "a DataParallel student replicates the model on every call"
    if torch.is_autocast_enabled("cuda"):
        return "an outer torch.autocast block: pass autocast_dtype to DINOStep instead"
    return None


class FlatGradients:
    """Parameters' gradients as views into one buffer per dtype, so that all of them are averaged
    over processes by one all-reduce per buffer (what DDP's buckets do, here after the backward)."""

    def __init__(self, params: Sequence[nn.Parameter]):
        self.buffers: List[torch.Tensor] = []
        self._views: List[Tuple[nn.Parameter, torch.Tensor]] = []
        by_dtype = {}
        for p in params:
            by_dtype.setdefault((p.dtype, p.device), []).append(p)
        for (dtype, device), group in by_dtype.items():
            buffer = torch.zeros(sum(p.numel() for p in group), dtype=dtype, device=device)
            offset = 0
            for p in group:
                self._views.append((p, buffer[offset:offset + p.numel()].view_as(p)))
                offset += p.numel()
            self.buffers.append(buffer)
        self.attach()

    def attach(self) -> None:
        """Point every parameter's .grad at its view again (code between steps may have dropped it, e.g.
        the frozen last layer), so that the optimizer reads what the next step writes into the buffers."""
        for p, view in self._views:
            if p.grad is not view:
                p.grad = view

    def write(self, grads: Dict[nn.Parameter, Optional[torch.Tensor]]) -> None:
        """Copy each parameter's gradient (None or absent: zero) into its view."""
        with torch.no_grad():
            for p, view in self._views:
                grad = grads.get(p)
                if grad is None:
                    view.zero_()
                else:
                    view.copy_(grad)

    @torch.no_grad()
    def all_reduce_mean(self, group=None) -> None:
        world = dist.get_world_size(group)
        for buffer in self.buffers:
            dist.all_reduce(buffer, group=group)
            buffer.div_(world)


class GraphedForwardBackward:
    """forward_backward recorded once into a CUDA graph and replayed: one launch instead of thousands.

    The DINO step's shapes never change (2 global + N local crops of fixed sizes), so its forward,
    loss, backward and gradient clipping (several thousand kernel launches, host-bound for a
    ViT-S) can be captured once (fastvision.cuda_graphs.CapturedCall): the first ``warmup_steps``
    calls for a crop layout and teacher temperature run eagerly, the next one captures, later
    calls copy the crops into the graph's inputs and replay it. The optimizer step and EMA update
    stay outside the graph, so learning-rate, weight-decay and momentum schedules (Python numbers)
    apply as usual; parameters are updated in place and the graph reads them on its next replay.
    Drop path draws fresh random numbers on each replay (the CUDA generator advances with the graph).

    Under torch.distributed no collective runs inside the graph: the teacher centre's all-reduce and
    EMA follow each replay, and for a DistributedDataParallel student the graph runs the wrapped
    module on aliases of its parameters (DDP's hooks and gradient nodes stay idle), its gradients live in
    flat buffers (``FlatGradients``) averaged by one all-reduce each after the replay, and clipping
    follows that average, as with DDP.
    ``call_factory`` (default CapturedCall) builds the recorded call from the step function.
    """

    def __init__(self, warmup_steps: int = 2, call_factory=CapturedCall):
        self.warmup_steps = warmup_steps
        self.call_factory = call_factory
        self._key = None
        self._call: Optional[CapturedCall] = None
        self._inputs: List[torch.Tensor] = []
        self._flat_grads: Optional[FlatGradients] = None

    @property
    def captured(self) -> bool:
        return self._call is not None and self._call.captured

    def __call__(self, step: "DINOStep", crops: Sequence[torch.Tensor], epoch: int) -> torch.Tensor:
        crops = list(crops)
        ddp = isinstance(step.student, nn.parallel.DistributedDataParallel)
        key = (tuple((c.shape, c.dtype, c.device) for c in crops), step.loss_fn.teacher_temp(epoch))
        if key != self._key:
            self._key = key  # a new layout or temperature: warm up and capture again
            self._inputs = [torch.empty_like(c) for c in crops]
            if ddp and self._flat_grads is None:
                self._flat_grads = FlatGradients([p for p in step.student.parameters() if p.requires_grad])
            self._call = self.call_factory(lambda: self._forward_backward(step, epoch, ddp),
                                           warmup_steps=self.warmup_steps, grad_params=step.student.parameters())
        if ddp:
            self._flat_grads.attach()
        for static, crop in zip(self._inputs, crops):
            static.copy_(crop, non_blocking=True)
        distributed = _distributed()
        step.loss_fn.defer_center_update = distributed
        try:
            loss = self._call().clone()
        finally:
            step.loss_fn.defer_center_update = False
        if distributed:
            step.loss_fn.apply_center_update(*step.loss_fn.pending_center_sum)
        if ddp:
            self._flat_grads.all_reduce_mean(step.student.process_group)
            if step.clip_grad:
                clip_gradients(step.student, step.clip_grad)
        return loss

    def _forward_backward(self, step: "DINOStep", epoch: int, ddp: bool) -> torch.Tensor:
        if ddp:
            return self._forward_backward_ddp(step, epoch)
        step.optimizer.zero_grad(set_to_none=True)  # inside a capture: the graph allocates (and owns) the gradients
        return forward_backward(step.student, step.teacher, step.loss_fn, self._inputs, epoch,
                                clip_grad=step.clip_grad, autocast_dtype=step.autocast_dtype)

    def _forward_backward_ddp(self, step: "DINOStep", epoch: int) -> torch.Tensor:
        """The wrapped module run on fresh aliases of its parameters (same storage, so optimizer updates
        reach the graph), their gradients written into the flat buffers. DistributedDataParallel keeps
        the parameters' own AccumulateGrad nodes from its construction, tied to the stream they were
        made on; a capture on another stream whose backward feeds them must wait on that stream,
        which invalidates the capture. The aliases' nodes are made on the capturing stream."""
        module = step.student.module
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        aliases = {name: p.detach().requires_grad_() for name, p in named}

        def student(crops):
            return torch.func.functional_call(module, aliases, (crops,))

        def backward(loss):
            grads = torch.autograd.grad(loss, list(aliases.values()), allow_unused=True)
            self._flat_grads.write({p: grad for (_, p), grad in zip(named, grads)})
        return forward_backward(student, step.teacher, step.loss_fn, self._inputs, epoch, clip_grad=0.0,
                                autocast_dtype=step.autocast_dtype, backward=backward)


class DINOStep:
    """dino_train_step with its models, loss, optimizer and settings bound: ``step(crops, epoch, momentum)``.

    ``cuda_graph=True`` replays the forward, loss, backward and clipping from a CUDA graph
    (GraphedForwardBackward) where ``why_not_graphed`` allows it, and runs the eager step otherwise;
    ``graphed`` says which ran last. A capture that fails (an operation CUDA graphs cannot record)
    warns once and leaves the step eager, with the error in ``why_not_graphed``.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, loss_fn: DINOLoss,
                 optimizer: torch.optim.Optimizer, *, clip_grad: float = 3.0, freeze_last_layer: int = 1,
                 autocast_dtype: Optional[torch.dtype] = None, cuda_graph: bool = False,
                 graph_warmup_steps: int = 2):
        self.student, self.teacher, self.loss_fn, self.optimizer = student, teacher, loss_fn, optimizer
        self.clip_grad = clip_grad
        self.freeze_last_layer = freeze_last_layer
        self.autocast_dtype = autocast_dtype
        self.graph = GraphedForwardBackward(graph_warmup_steps) if cuda_graph else None
        self.graphed = False
        self.capture_error: Optional[str] = None  # set when a capture failed: the step stays eager

    def why_not_graphed(self, crops: Sequence[torch.Tensor]) -> Optional[str]:
        if self.graph is None:
            return "cuda_graph=False"
        return self.capture_error or why_not_graphed(self.student, list(crops))

    def __call__(self, crops: Sequence[torch.Tensor], epoch: int, teacher_momentum: float) -> torch.Tensor:
        crops = list(crops)
        self.graphed = self.graph is not None and self.why_not_graphed(crops) is None
        if self.graphed:
            try:
                loss = self.graph(self, crops, epoch)
            except CaptureError as exc:
                self.capture_error, self.graphed = str(exc), False
                warnings.warn(f"DINOStep(cuda_graph=True) runs eagerly from now on: {exc}", RuntimeWarning)
        if not self.graphed:
            return dino_train_step(self.student, self.teacher, self.loss_fn, self.optimizer, crops, epoch,
                                   teacher_momentum, clip_grad=self.clip_grad,
                                   freeze_last_layer=self.freeze_last_layer, autocast_dtype=self.autocast_dtype)
        apply_update(self.student, self.teacher, self.optimizer, epoch, teacher_momentum,
                     freeze_last_layer=self.freeze_last_layer)
        return loss


__all__ = ["DINOHead", "DINOLoss", "DINOStep", "FlatGradients", "GraphedForwardBackward", "MultiCropWrapper",
           "apply_update", "build_backbone", "build_dino", "cancel_gradients_last_layer", "clip_gradients", "cosine_scheduler",
           "dino_train_step", "dino_vit", "ema_update", "forward_backward", "param_groups", "resolution_groups",
           "teacher_temperature_schedule", "unwrap", "weight_norm_linear", "why_not_graphed"]
