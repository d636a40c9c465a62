"""Train DINO (self-distillation with no labels) with fastvision's fused kernels, then report k-NN accuracy.

    # a tiny synthetic run on the CPU (no downloads): coloured shapes, 4 classes
    python examples/train_dino.py --synthetic 200 --arch vit_tiny --img-size 32 --local-size 16 \
        --epochs 2 --batch-size 16 --out-dim 1024 --output-dir /tmp/dino

    # ViT-S/16 on an ImageFolder (DATA/train and, for k-NN, DATA/val), 8 GPUs
    torchrun --nproc_per_node 8 examples/train_dino.py --data-path DATA --arch vit_small --patch-size 16 \
        --epochs 100 --batch-size 64 --output-dir runs/vit_s16

The pieces (head, multi-crop wrapper, loss, EMA, clipping, one step) are fastvision.dino's;
`--no-fastvision` trains the same model with eager timm modules (checkpoints are interchangeable).
"""
import argparse
import math
import os
import random
import sys
import time
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms

import fastvision
from fastvision import dino

try:
    from tqdm import tqdm
except ImportError:  # progress lines instead of a bar
    tqdm = None

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="DINO training with fastvision", allow_abbrev=False)
    m = p.add_argument_group("model")
    m.add_argument("--arch", default="vit_small", help="vit_tiny / vit_small / vit_base, a timm ViT name, or a "
                   "timm CNN such as resnet50")
    m.add_argument("--patch-size", type=int, default=16)
    m.add_argument("--depth", type=int, default=None, help="override the ViT depth (small test models)")
    m.add_argument("--out-dim", type=int, default=65536)
    m.add_argument("--norm-last-layer", action=argparse.BooleanOptionalAction, default=True)
    m.add_argument("--use-bn-in-head", action="store_true")
    m.add_argument("--drop-path-rate", type=float, default=0.1)
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=100)
    o.add_argument("--batch-size", type=int, default=64, help="images per process")
    o.add_argument("--lr", type=float, default=5e-4, help="peak lr at a total batch of 256 (scaled linearly)")
    o.add_argument("--min-lr", type=float, default=1e-6)
    o.add_argument("--warmup-epochs", type=int, default=10)
    o.add_argument("--weight-decay", type=float, default=0.04)
    o.add_argument("--weight-decay-end", type=float, default=0.4)
    o.add_argument("--momentum-teacher", type=float, default=0.996, help="cosine-scheduled to 1")
    o.add_argument("--warmup-teacher-temp", type=float, default=0.04)
    o.add_argument("--teacher-temp", type=float, default=0.04, help="e.g. 0.07 with --warmup-teacher-temp-epochs 30")
    o.add_argument("--warmup-teacher-temp-epochs", type=int, default=0)
    o.add_argument("--freeze-last-layer", type=int, default=1)
    o.add_argument("--clip-grad", type=float, default=3.0, help="per-parameter gradient norm limit; 0 disables")
    o.add_argument("--max-steps-per-epoch", type=int, default=None, help="cut epochs short (quick runs, tests)")
    a = p.add_argument_group("augmentation")
    a.add_argument("--img-size", type=int, default=224, help="global crop size")
    a.add_argument("--local-size", type=int, default=96, help="local crop size")
    a.add_argument("--global-crops-scale", type=float, nargs=2, default=(0.4, 1.0))
    a.add_argument("--local-crops-number", type=int, default=8)
    a.add_argument("--local-crops-scale", type=float, nargs=2, default=(0.05, 0.4))
    d = p.add_argument_group("data and run")
    d.add_argument("--data-path", default=None, help="ImageFolder root (or a root with train/ and val/)")
    d.add_argument("--synthetic", type=int, default=None, metavar="N",
                   help="generate N labelled images of coloured shapes under OUTPUT_DIR/synthetic and train on them")
    d.add_argument("--output-dir", default="dino_output")
    d.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="checkpoint to resume from (default OUTPUT_DIR/checkpoint.pth)")
    d.add_argument("--saveckp-freq", type=int, default=20)
    d.add_argument("--num-workers", type=int, default=4)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--print-freq", type=int, default=10)
    d.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    s = p.add_argument_group("speed")
    s.add_argument("--fastvision", action=argparse.BooleanOptionalAction, default=True,
                   help="patch student and teacher with fastvision's fused modules")
    s.add_argument("--mlp-recompute", action="store_true",
                   help="with --fastvision: recompute the MLPs' GELU outputs in the backward (less activation memory)")
    s.add_argument("--compile", action="store_true", help="torch.compile the backbones")
    s.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each step's forward/backward from a CUDA graph (new crop shapes capture again; "
                        "under torchrun the gradients are all-reduced after each replay). Default: on with CUDA, "
                        "where a ViT-S step is otherwise bound by the host's launch time (2.04x eager with the "
                        "graph, 0.73x without, H100)")
    s.add_argument("--amp", choices=("bf16", "none"), default=None, help="default: bf16 on CUDA, none on CPU")
    k = p.add_argument_group("k-NN evaluation")
    k.add_argument("--knn-k", type=int, default=20)
    k.add_argument("--knn-temperature", type=float, default=0.07)
    k.add_argument("--no-knn", action="store_true")
    args = p.parse_args(argv)
    if (args.data_path is None) == (args.synthetic is None):
        p.error("give exactly one of --data-path and --synthetic N")
    return args


# --- distributed -------------------------------------------------------------------------------

def init_distributed(args) -> None:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; one process per GPU."""
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args.rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wants_cuda = args.device is None and torch.cuda.is_available() or (args.device or "").startswith("cuda")
    if args.world_size > 1:
        if wants_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if wants_cuda else "gloo")
    args.device = torch.device(f"cuda:{local_rank}" if wants_cuda else (args.device or "cpu"))
    if args.amp is None:
        args.amp = "bf16" if args.device.type == "cuda" else "none"
    if args.cuda_graph is None:
        args.cuda_graph = args.device.type == "cuda"


def is_main(args) -> bool:
    return args.rank == 0


def barrier(args) -> None:
    if args.world_size > 1:
        dist.barrier()


def log(args, *message) -> None:
    if is_main(args):
        print(*message, flush=True)


# --- synthetic data ------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ((220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 200, 40))


def draw_shape(kind: int, size: int, rng: random.Random):
    """A coloured shape (class ``kind``) at a random place and scale on a noisy background."""
    from PIL import Image, ImageDraw

    background = tuple(rng.randint(60, 160) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for _ in range(6):  # clutter
        x, y = rng.randint(0, size), rng.randint(0, size)
        draw.point((x, y), fill=tuple(rng.randint(0, 255) for _ in range(3)))
    r = rng.uniform(0.22, 0.4) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    colour = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in COLOURS[kind])
    if SHAPES[kind] == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif SHAPES[kind] == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif SHAPES[kind] == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    return image


def make_synthetic_folder(root: str, n_train: int, size: int = 64, seed: int = 0) -> str:
    """root/train/<class>/*.png (n_train images) and root/val/<class>/*.png (a quarter as many)."""
    n_val = max(len(SHAPES) * 2, n_train // 4)
    marker = os.path.join(root, f".complete_{n_train}_{size}")
    if os.path.exists(marker):
        return root
    rng = random.Random(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        for i in range(count):
            kind = i % len(SHAPES)
            folder = os.path.join(root, split, SHAPES[kind])
            os.makedirs(folder, exist_ok=True)
            draw_shape(kind, size, rng).save(os.path.join(folder, f"{i:05d}.png"))
    open(marker, "w").close()
    return root


# --- augmentation --------------------------------------------------------------------------------

def _blur(size: int, p: float):
    kernel = max(3, (size // 10) | 1)
    return transforms.RandomApply([transforms.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=p)


class DataAugmentationDINO:
    """Two global crops (blur always / rarely + solarisation) and N local crops, as in DINO."""

    def __init__(self, global_size: int, local_size: int, global_scale, local_scale, local_number: int):
        bicubic = transforms.InterpolationMode.BICUBIC
        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
        ])
        normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        global_crop = transforms.RandomResizedCrop(global_size, scale=tuple(global_scale), interpolation=bicubic)
        self.global1 = transforms.Compose([global_crop, flip_and_color_jitter, _blur(global_size, 1.0), normalize])
        self.global2 = transforms.Compose([global_crop, flip_and_color_jitter, _blur(global_size, 0.1),
                                           transforms.RandomSolarize(128, p=0.2), normalize])
        self.local = transforms.Compose([
            transforms.RandomResizedCrop(local_size, scale=tuple(local_scale), interpolation=bicubic),
            flip_and_color_jitter, _blur(local_size, 0.5), normalize])
        self.local_number = local_number

    def __call__(self, image) -> List[torch.Tensor]:
        return [self.global1(image), self.global2(image)] + [self.local(image) for _ in range(self.local_number)]


def eval_transform(size: int):
    return transforms.Compose([
        transforms.Resize(int(round(size * 256 / 224)), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def data_roots(args) -> Tuple[str, Optional[str]]:
    """(training root, k-NN query root or None to split the training set)."""
    if args.synthetic is not None:
        root = os.path.join(args.output_dir, "synthetic")
        if is_main(args):
            make_synthetic_folder(root, args.synthetic, size=max(64, args.img_size), seed=args.seed)
        barrier(args)
        return os.path.join(root, "train"), os.path.join(root, "val")
    train = os.path.join(args.data_path, "train")
    if os.path.isdir(train):
        val = os.path.join(args.data_path, "val")
        return train, val if os.path.isdir(val) else None
    return args.data_path, None


def train_loader(args, root: str) -> DataLoader:
    augment = DataAugmentationDINO(args.img_size, args.local_size, args.global_crops_scale, args.local_crops_scale,
                                   args.local_crops_number)
    dataset = datasets.ImageFolder(root, transform=augment)
    sampler = torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=args.seed) \
        if args.world_size > 1 else torch.utils.data.RandomSampler(dataset)
    full_batches = len(dataset) >= args.batch_size * args.world_size
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                      pin_memory=args.device.type == "cuda", drop_last=full_batches,
                      persistent_workers=args.num_workers > 0)


# --- model ---------------------------------------------------------------------------------------

def build_models(args):
    extra = {} if args.depth is None else {"depth": args.depth}
    if args.arch.startswith(("vit", "deit")):
        extra["img_size"] = args.img_size
    student, teacher = dino.build_dino(args.arch, args.patch_size, args.out_dim, drop_path_rate=args.drop_path_rate,
                                       norm_last_layer=args.norm_last_layer, use_bn_in_head=args.use_bn_in_head,
                                       **extra)
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules())
    if args.world_size > 1 and has_batchnorm:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    student, teacher = student.to(args.device), teacher.to(args.device)
    if args.fastvision:
        fastvision.patch(student, mlp_recompute=args.mlp_recompute)
        fastvision.patch(teacher, mlp_recompute=args.mlp_recompute)
        counts = fastvision.patch_report(student).counts()
        log(args, "fastvision.patch:", ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "nothing")
    if args.compile:
        student.backbone.compile(dynamic=False)
        teacher.backbone.compile(dynamic=False)
    if args.world_size > 1:
        device_ids = [args.device.index] if args.device.type == "cuda" else None
        student = nn.parallel.DistributedDataParallel(student, device_ids=device_ids)
    return student, teacher


# --- checkpoints ---------------------------------------------------------------------------------

def save_checkpoint(args, path: str, student, teacher, optimizer, loss_fn, epoch: int) -> None:
    if not is_main(args):
        return
    state = {"student": dino.unwrap(student).state_dict(), "teacher": teacher.state_dict(),
             "optimizer": optimizer.state_dict(), "dino_loss": loss_fn.state_dict(), "epoch": epoch,
             "args": {k: v for k, v in vars(args).items() if k != "device"}}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def resume(args, student, teacher, optimizer, loss_fn) -> int:
    """Load the checkpoint named by --resume; returns the epoch to start from."""
    if args.resume is None:
        return 0
    path = os.path.join(args.output_dir, "checkpoint.pth") if args.resume == "auto" else args.resume
    if not os.path.exists(path):
        log(args, f"no checkpoint at {path}: starting from scratch")
        return 0
    state = torch.load(path, map_location=args.device, weights_only=False)
    dino.unwrap(student).load_state_dict(state["student"])
    teacher.load_state_dict(state["teacher"])
    optimizer.load_state_dict(state["optimizer"])
    loss_fn.load_state_dict(state["dino_loss"])
    log(args, f"resumed from {path} at epoch {state['epoch']}")
    return state["epoch"]


# --- training ------------------------------------------------------------------------------------

def progress(iterable, total: int, desc: str, args):
    if tqdm is not None and is_main(args):
        return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, file=sys.stdout)
    return iterable


def train_one_epoch(args, epoch, loader, niter, step, schedules, show) -> float:
    lr_schedule, wd_schedule, momentum_schedule = schedules
    bar = progress(loader, niter, f"epoch {epoch + 1}/{args.epochs}", args)
    loss_sum, start = None, time.perf_counter()
    for i, (crops, _) in enumerate(bar):
        if i >= niter:
            break
        it = epoch * niter + i
        for j, group in enumerate(step.optimizer.param_groups):
            group["lr"] = lr_schedule[it]
            if j == 0:  # the weight-decayed group
                group["weight_decay"] = wd_schedule[it]
        crops = [c.to(args.device, non_blocking=True) for c in crops]
        loss = step(crops, epoch, momentum_schedule[it])
        if i == 0 and epoch == args.start_epoch and step.graph is not None and is_main(args):
            reason = step.why_not_graphed(crops)
            print(f"CUDA graph: {'off, ' + reason if reason else 'on (captured after the warm-up steps)'}", flush=True)
        loss_sum = loss if loss_sum is None else loss_sum + loss
        if (i + 1) % args.print_freq == 0 or i + 1 == niter:  # the only host syncs of the loop
            value = loss.item()
            if not math.isfinite(value):
                raise SystemExit(f"loss is {value}, stopping")
            show(bar, i, value, lr_schedule[it], wd_schedule[it], time.perf_counter() - start)
    return (loss_sum / niter).item()


def show_progress(args):
    def show(bar, i, loss, lr, wd, elapsed):
        if not is_main(args):
            return
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", wd=f"{wd:.3f}")
        else:
            print(f"  it {i + 1}: loss {loss:.4f} lr {lr:.2e} wd {wd:.3f} ({elapsed:.1f}s)", flush=True)
    return show


# --- k-NN evaluation -----------------------------------------------------------------------------

@torch.no_grad()
def extract_features(backbone: nn.Module, dataset: Dataset, args) -> Tuple[torch.Tensor, torch.Tensor]:
    loader = DataLoader(dataset, batch_size=max(args.batch_size, 64), num_workers=args.num_workers)
    feats, labels = [], []
    amp = args.amp == "bf16"
    for images, target in loader:
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=amp):
            out = backbone(images.to(args.device))
        feats.append(F.normalize(out.float(), dim=1))
        labels.append(target.to(args.device))
    return torch.cat(feats), torch.cat(labels)


def knn_classify(train_feats, train_labels, test_feats, test_labels, k: int, temperature: float,
                 num_classes: int) -> float:
    """Weighted k-NN (DINO): cosine similarity, votes weighted by exp(sim / T); top-1 accuracy in %."""
    k = min(k, train_feats.shape[0])
    similarity = test_feats @ train_feats.t()
    top_sim, top_idx = similarity.topk(k, dim=1)
    votes = F.one_hot(train_labels[top_idx], num_classes).float() * (top_sim / temperature).exp().unsqueeze(-1)
    predictions = votes.sum(1).argmax(1)
    return (predictions == test_labels).float().mean().item() * 100


def knn_accuracy(args, teacher: nn.Module, train_root: str, val_root: Optional[str]) -> None:
    transform = eval_transform(args.img_size)
    train_set = datasets.ImageFolder(train_root, transform=transform)
    if val_root is not None:
        val_set = datasets.ImageFolder(val_root, transform=transform)
        memory, queries = train_set, val_set
    else:  # no val/: a fixed 80/20 split of the training images
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0)).tolist()
        cut = int(0.8 * len(order))
        memory, queries = Subset(train_set, order[:cut]), Subset(train_set, order[cut:])
    backbone = teacher.backbone
    was_training = backbone.training
    backbone.eval()
    train_feats, train_labels = extract_features(backbone, memory, args)
    test_feats, test_labels = extract_features(backbone, queries, args)
    backbone.train(was_training)
    classes = len(train_set.classes)
    top1 = knn_classify(train_feats, train_labels, test_feats, test_labels, args.knn_k, args.knn_temperature,
                        classes)
    print(f"k-NN accuracy (teacher, k={min(args.knn_k, len(train_labels))}, T={args.knn_temperature}): "
          f"top-1 {top1:.2f}% on {len(test_labels)} images, {classes} classes "
          f"(chance {100 / classes:.1f}%)", flush=True)


# --- main ----------------------------------------------------------------------------------------

def main(argv=None) -> None:
    args = parse_args(argv)
    init_distributed(args)
    torch.manual_seed(args.seed + args.rank)
    random.seed(args.seed + args.rank)
    os.makedirs(args.output_dir, exist_ok=True)
    train_root, val_root = data_roots(args)
    loader = train_loader(args, train_root)
    niter = len(loader) if args.max_steps_per_epoch is None else min(len(loader), args.max_steps_per_epoch)
    log(args, f"{len(loader.dataset)} training images, {niter} steps per epoch, {args.world_size} process(es), "
        f"device {args.device}, amp {args.amp}")

    student, teacher = build_models(args)
    ncrops = 2 + args.local_crops_number
    loss_fn = dino.DINOLoss(args.out_dim, ncrops, args.warmup_teacher_temp, args.teacher_temp,
                            args.warmup_teacher_temp_epochs, args.epochs).to(args.device)
    fused = {"fused": True} if args.device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(dino.param_groups(student), **fused)
    total_batch = args.batch_size * args.world_size
    schedules = (
        dino.cosine_scheduler(args.lr * total_batch / 256, args.min_lr, args.epochs, niter,
                              warmup_epochs=min(args.warmup_epochs, args.epochs - 1)),
        dino.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, niter),
        dino.cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, niter),
    )
    start_epoch = args.start_epoch = resume(args, student, teacher, optimizer, loss_fn)
    step = dino.DINOStep(student, teacher, loss_fn, optimizer, clip_grad=args.clip_grad,
                         freeze_last_layer=args.freeze_last_layer,
                         autocast_dtype=torch.bfloat16 if args.amp == "bf16" else None, cuda_graph=args.cuda_graph)

    checkpoint = os.path.join(args.output_dir, "checkpoint.pth")
    for epoch in range(start_epoch, args.epochs):
        if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
            loader.sampler.set_epoch(epoch)
        start = time.perf_counter()
        mean_loss = train_one_epoch(args, epoch, loader, niter, step, schedules, show_progress(args))
        log(args, f"epoch {epoch + 1}/{args.epochs}: mean loss {mean_loss:.4f}, "
            f"{niter * total_batch / (time.perf_counter() - start):.1f} images/s")
        save_checkpoint(args, checkpoint, student, teacher, optimizer, loss_fn, epoch + 1)
        if args.saveckp_freq and (epoch + 1) % args.saveckp_freq == 0:
            save_checkpoint(args, os.path.join(args.output_dir, f"checkpoint{epoch + 1:04d}.pth"), student,
                            teacher, optimizer, loss_fn, epoch + 1)
    log(args, f"checkpoint: {checkpoint}")

    if not args.no_knn and is_main(args):
        knn_accuracy(args, teacher, train_root, val_root)
    barrier(args)
    if args.world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
