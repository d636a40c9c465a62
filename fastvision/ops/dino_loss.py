"""The DINO loss as one fused torch.library custom op (kernels: triton_kernels/dino_loss.py).

``dino_loss(student_output, teacher_output, center, ncrops=, student_temp=, teacher_temp=)``:
the cross-entropy between the centred, sharpened teacher distributions of the G global crops
and the student distributions of every other crop, averaged over images and the G·(ncrops - 1)
pairs, as fastvision.dino.DINOLoss computes it (without the centre update). Outputs are
crop-major: student (ncrops·B, K), teacher (G·B, K); the gradient flows to the student only.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _common as C
from ._dispatch import call, define

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_CROPS = 64  # crops of one image share a register tile


def _kernels():
    return C.triton_kernels.dino_loss


def dino_loss_reference(student_output: Tensor, teacher_output: Tensor, center: Tensor, ncrops: int,
                        student_temp: float, teacher_temp: float) -> Tensor:
    """The eager math (DINOLoss's), in float32 or wider, differentiable in the student output."""
    dtype = torch.promote_types(student_output.dtype, torch.float32)
    K = student_output.shape[-1]
    log_p = F.log_softmax(student_output.to(dtype) / student_temp, dim=-1).view(ncrops, -1, K)
    q = F.softmax((teacher_output.detach().to(dtype) - center.reshape(1, K)) / teacher_temp, dim=-1)
    q = q.view(-1, log_p.shape[1], K)
    sum_log_p = log_p.sum(0)
    total = sum(-(q[i] * (sum_log_p - log_p[i])).sum(-1).mean() for i in range(q.shape[0]))
    return total / (q.shape[0] * (ncrops - 1))


def _scaled(student: Tensor, teacher: Tensor, center: Tensor, student_temp: float, teacher_temp: float):
    return student.float() / student_temp, (teacher.float() - center.float()) / teacher_temp


def _eager_forward(student, teacher, center, ncrops, student_temp, teacher_temp):
    """Same outputs as the kernels: (loss, student lse, teacher lse), in torch."""
    x, u = _scaled(student, teacher, center, student_temp, teacher_temp)
    K = x.shape[-1]
    lse_s, lse_t = torch.logsumexp(x, -1), torch.logsumexp(u, -1)
    x = x.view(ncrops, -1, K)
    B = x.shape[1]
    q = torch.exp(u - lse_t[:, None]).view(-1, B, K)
    n_global = q.shape[0]
    cross = (q * (x.sum(0) - x[:n_global])).sum(-1)                    # (G, B)
    lse = lse_s.view(ncrops, B)
    per_image = (n_global * lse.sum(0) - lse[:n_global].sum(0) - cross.sum(0))
    return per_image.sum() / (B * n_global * (ncrops - 1)), lse_s, lse_t


def _eager_backward(grad, student, teacher, center, lse_s, lse_t, ncrops, student_temp, teacher_temp):
    x, u = _scaled(student, teacher, center, student_temp, teacher_temp)
    K = x.shape[-1]
    p = torch.exp(x - lse_s[:, None]).view(ncrops, -1, K)
    B = p.shape[1]
    q = torch.exp(u - lse_t[:, None]).view(-1, B, K)
    n_global = q.shape[0]
    n_teachers = torch.full((ncrops, 1, 1), float(n_global), device=x.device)
    n_teachers[:n_global] -= 1
    ds = n_teachers * p - q.sum(0)
    ds[:n_global] += q
    scale = grad.float() / (B * n_global * (ncrops - 1) * student_temp)
    return (ds * scale).view(student.shape).to(student.dtype)


def _dino_loss_impl(student: Tensor, teacher: Tensor, center: Tensor, ncrops: int, student_temp: float,
                    teacher_temp: float) -> Tuple[Tensor, Tensor, Tensor]:
    if not C.use_triton(student):
        return _eager_forward(student, teacher, center, ncrops, student_temp, teacher_temp)
    return _kernels().dino_loss_fwd(student, teacher, center, ncrops, student_temp, teacher_temp)


def _dino_loss_fake(student, teacher, center, ncrops, student_temp, teacher_temp):
    return (student.new_empty((), dtype=torch.float32), student.new_empty(student.shape[0], dtype=torch.float32),
            student.new_empty(teacher.shape[0], dtype=torch.float32))


def _dino_loss_backward_impl(grad: Tensor, student: Tensor, teacher: Tensor, center: Tensor, lse_s: Tensor,
                             lse_t: Tensor, ncrops: int, student_temp: float, teacher_temp: float) -> Tensor:
    if not C.use_triton(student):
        return _eager_backward(grad, student, teacher, center, lse_s, lse_t, ncrops, student_temp, teacher_temp)
    grad = grad.to(torch.float32).contiguous()
    return _kernels().dino_loss_bwd(grad, student, teacher, center, lse_s, lse_t, ncrops, student_temp, teacher_temp)


def _dino_loss_backward_fake(grad, student, teacher, center, lse_s, lse_t, ncrops, student_temp, teacher_temp):
    return student.new_empty(student.shape)


def _setup(ctx, inputs, output):
    student, teacher, center, ncrops, student_temp, teacher_temp = inputs
    _, lse_s, lse_t = output
    ctx.save_for_backward(student, teacher, center, lse_s, lse_t)
    ctx.settings = (ncrops, student_temp, teacher_temp)
    ctx.mark_non_differentiable(lse_s, lse_t)


def _backward(ctx, grad, _grad_lse_s, _grad_lse_t):
    student, teacher, center, lse_s, lse_t = ctx.saved_tensors
    ds = call("dino_loss_backward", grad, student, teacher, center, lse_s, lse_t, *ctx.settings)
    return ds, None, None, None, None, None


define("dino_loss_backward", _dino_loss_backward_impl, _dino_loss_backward_fake)
define("dino_loss", _dino_loss_impl, _dino_loss_fake, setup_context=_setup, backward=_backward)


def _check_temperature(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _validate(student: Tensor, teacher: Tensor, center: Tensor, ncrops, student_temp, teacher_temp) -> None:
    for name, t in (("student_output", student), ("teacher_output", teacher), ("center", center)):
        if t is None:
            raise TypeError(f"{name} must be a torch.Tensor, got None")
        C.check_floating(name, t)
    if isinstance(ncrops, bool) or not isinstance(ncrops, int) or ncrops < 2:
        raise ValueError(f"ncrops must be an int >= 2 (a teacher crop needs another student crop), got {ncrops!r}")
    _check_temperature("student_temp", student_temp)
    _check_temperature("teacher_temp", teacher_temp)
    if student.dim() != 2 or student.shape[0] == 0 or student.shape[0] % ncrops:
        raise ValueError(f"student_output must be (ncrops·B, K) = ({ncrops}·B, K) with B >= 1, "
                         f"got shape {tuple(student.shape)}")
    rows, K = student.shape
    B = rows // ncrops
    if teacher.dim() != 2 or teacher.shape[1] != K or teacher.shape[0] % B or not B <= teacher.shape[0] <= rows:
        raise ValueError(f"teacher_output must be (G·B, K) = (G·{B}, {K}) with 1 <= G <= ncrops, "
                         f"got shape {tuple(teacher.shape)}")
    if center.dim() > 2 or center.numel() != K or center.shape[-1] != K:
        raise ValueError(f"center must have shape ({K},) or (1, {K}), got {tuple(center.shape)}")
    C.check_same_device(student_output=student, teacher_output=teacher, center=center)


def dino_loss_decline(student_output: Tensor, teacher_output: Tensor, center: Tensor, *,
                      ncrops: int) -> Optional[str]:
    """Why the fused DINO loss will not run on these inputs (None: it will)."""
    if ncrops > MAX_CROPS:
        return f"ncrops={ncrops} is above the {MAX_CROPS} crops one program holds"
    if student_output.shape[-1] == 0:
        return "out_dim is 0"
    return C.first_decline(C.device_decline(student_output), C.dtype_decline(student_output, KERNEL_DTYPES),
                           C.dtype_decline(teacher_output, KERNEL_DTYPES), C.dtype_decline(center))


def dino_loss(student_output: Tensor, teacher_output: Tensor, center: Tensor, *, ncrops: int,
              student_temp: float = 0.1, teacher_temp: float) -> Tensor:
    """DINO's multi-crop cross-entropy (a 0-d float32 tensor, float64 for float64 inputs)."""
    _validate(student_output, teacher_output, center, ncrops, student_temp, teacher_temp)
    teacher_output, center = teacher_output.detach(), center.detach()
    if dino_loss_decline(student_output, teacher_output, center, ncrops=ncrops) is not None:
        return dino_loss_reference(student_output, teacher_output, center, ncrops, student_temp, teacher_temp)
    K = student_output.shape[-1]
    # A copy: the backward reads the centre this loss used, and DINOLoss updates its buffer in place.
    center = center.reshape(K).to(torch.float32, copy=True).contiguous()
    loss, _, _ = call("dino_loss", C.as_rows(student_output, K), C.as_rows(teacher_output, K), center, ncrops,
                      float(student_temp), float(teacher_temp))
    return loss
