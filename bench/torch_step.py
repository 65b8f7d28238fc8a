#!/usr/bin/env python3
"""PyTorch twin of `cjepa bench train-step`: the same C-JEPA training step, timed the same way.

The networks follow the official I-JEPA code (facebookresearch/ijepa `src/models/
vision_transformer.py`: conv patch embedding, fixed 2-D sin-cos positions, pre-norm blocks with
the manual `softmax(q k^T * scale) v` attention, exact-erf GELU, the narrow predictor with mask
tokens), the step follows its `train.py` (target encoder without gradient -> layer_norm -> gather
the target blocks -> repeat per context mask; context encoder on the context tokens; predictor;
smooth-L1) plus C-JEPA's VICReg terms exactly as `src/train/loss.rs` computes them, then
backward, `torch.optim.AdamW` with the official two parameter groups, and the EMA.

Shapes: `--masks FILE` replays the masks (and architecture, batch) that
`cjepa bench train-step --masks-out FILE` used, so both run identical work; without it the
official multi-block sampler (1 context block of scale 0.85-1.0 minus 4 target blocks of
0.15-0.2, aspect 0.75-1.5) draws them here.

Threads are pinned with `--threads`: OMP/MKL environment variables before torch is imported, then
`torch.set_num_threads`. Prints one `RESULT ...` line that `bench/compare.sh` reads.

    python3 bench/torch_step.py --model vit_small --img 224 --batch 8 --steps 3 --threads 2

Trajectory mode (`--replay DIR --out FILE`, used by `bench/trajectory.sh`): a trainer after the
official `train.py` loop on the run that `cjepa bench trajectory run --replay` wrote into DIR: its
initial weights (official names), its batches and masks, its method, loss weights and schedule
settings. Per iteration, as the official code: `WarmupCosineSchedule.step()` and
`CosineWDSchedule.step()` (src/utils/schedulers.py, built as in src/helper.py::init_opt), the
target forward without gradient, context encoder, predictor, smooth-L1 (+ the VICReg terms for
C-JEPA), backward, `torch.optim.AdamW` over the official four parameter groups (no weight decay on
biases and 1-D parameters), then the EMA of every target-encoder parameter with the next value of
the momentum generator. Writes per step the loss terms, lr, wd, momentum, the gradient norm
(encoder + predictor, before the step), the parameter norms after the step (the fixed position
tables left out) and the target-feature std, as JSON that `cjepa bench trajectory compare` reads.

    python3 bench/torch_step.py --replay /tmp/t/replay --out /tmp/t/torch.json --threads 2
"""

import argparse
import json
import math
import os
import sys
import time

PRESETS = {
    # name: (embed_dim, depth, heads, patch, pred_depth, pred_embed_dim, img)
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3, patch_size=16, pred_depth=6,
                     pred_embed_dim=384, pred_num_heads=3, img_size=224),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, patch_size=16, pred_depth=6,
                      pred_embed_dim=384, pred_num_heads=6, img_size=224),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, patch_size=16, pred_depth=6,
                     pred_embed_dim=384, pred_num_heads=12, img_size=224),
    # the quickstart's small model, as `cjepa bench train-step --model quick`
    "quick": dict(embed_dim=192, depth=4, num_heads=3, patch_size=8, pred_depth=2,
                  pred_embed_dim=384, pred_num_heads=3, img_size=64),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_small", choices=sorted(PRESETS))
    p.add_argument("--img", type=int, default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--masks", default=None, help="JSON written by cjepa bench train-step --masks-out")
    p.add_argument("--attn", default="manual", choices=["manual", "sdpa"],
                   help="manual = the official code; sdpa = F.scaled_dot_product_attention")
    p.add_argument("--replay", default=None,
                   help="folder written by `cjepa bench trajectory run --replay`: train on it")
    p.add_argument("--out", default=None, help="trajectory JSON written in --replay mode")
    return p.parse_args()


ARGS = parse_args()
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import torch  # noqa: E402  (after the thread variables)
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(ARGS.threads)
try:
    torch.set_num_interop_threads(1)
except RuntimeError:
    pass


# ---- model (official I-JEPA code, drop rates 0) ----

def sincos_2d(dim, gh, gw):
    """Fixed 2-D sin-cos embedding (official get_2d_sincos_pos_embed, no cls token)."""
    import numpy as np

    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=float) / (d / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(gh, dtype=float)
    grid_w = np.arange(gw, dtype=float)
    grid = np.meshgrid(grid_w, grid_h)
    grid = np.stack(grid, axis=0).reshape([2, 1, gh, gw])
    emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    return torch.from_numpy(emb).float().unsqueeze(0)


def apply_masks(x, masks):
    all_x = []
    for m in masks:
        mask_keep = m.unsqueeze(-1).repeat(1, 1, x.size(-1))
        all_x += [torch.gather(x, dim=1, index=mask_keep)]
    return torch.cat(all_x, dim=0)


def repeat_interleave_batch(x, B, repeat):
    N = len(x) // B
    return torch.cat([torch.cat([x[i * B:(i + 1) * B] for _ in range(repeat)], dim=0)
                      for i in range(N)], dim=0)


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if ARGS.attn == "sdpa":
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            attn = attn.softmax(dim=-1)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_weights(m, std=0.02):
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=std)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, p, g = c["embed_dim"], c["patch_size"], c["img_size"] // c["patch_size"]
        self.patch_embed = PatchEmbed(p, c.get("in_chans", 3), d)
        self.pos_embed = nn.Parameter(sincos_2d(d, g, g), requires_grad=False)
        eps = c.get("ln_eps", 1e-6)
        self.blocks = nn.ModuleList([Block(d, c["num_heads"], c.get("mlp_ratio", 4.0), eps)
                                     for _ in range(c["depth"])])
        self.norm = nn.LayerNorm(d, eps=eps)
        self.apply(init_weights)

    def forward(self, x, masks=None):
        x = self.patch_embed(x)
        x = x + self.pos_embed
        if masks is not None:
            x = apply_masks(x, masks)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class Predictor(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, dp, g = c["embed_dim"], c["pred_embed_dim"], c["img_size"] // c["patch_size"]
        eps = c.get("ln_eps", 1e-6)
        self.predictor_embed = nn.Linear(d, dp)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dp))
        self.predictor_pos_embed = nn.Parameter(sincos_2d(dp, g, g), requires_grad=False)
        self.predictor_blocks = nn.ModuleList([
            Block(dp, c["pred_num_heads"], c.get("mlp_ratio", 4.0), eps) for _ in range(c["pred_depth"])])
        self.predictor_norm = nn.LayerNorm(dp, eps=eps)
        self.predictor_proj = nn.Linear(dp, d)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.apply(init_weights)

    def forward(self, x, masks_x, masks):
        B = len(x) // len(masks_x)
        x = self.predictor_embed(x)
        x_pos_embed = self.predictor_pos_embed.repeat(B, 1, 1)
        x = x + apply_masks(x_pos_embed, masks_x)
        _, n_ctxt, _ = x.shape
        pos_embs = self.predictor_pos_embed.repeat(B, 1, 1)
        pos_embs = apply_masks(pos_embs, masks)
        pos_embs = repeat_interleave_batch(pos_embs, B, repeat=len(masks_x))
        pred_tokens = self.mask_token.repeat(pos_embs.size(0), pos_embs.size(1), 1)
        pred_tokens = pred_tokens + pos_embs
        x = x.repeat(len(masks), 1, 1)
        x = torch.cat([x, pred_tokens], dim=1)
        for blk in self.predictor_blocks:
            x = blk(x)
        x = self.predictor_norm(x)
        x = x[:, n_ctxt:]
        return self.predictor_proj(x)


# ---- masks: replayed from cjepa, or the official multi-block sampler ----

def sample_masks(gen, grid, batch, min_keep):
    """The official MaskCollator (nenc 1, npred 4, scales as in the paper)."""
    def block_size(scale, aspect):
        r = torch.rand(1, generator=gen).item()
        s = scale[0] + r * (scale[1] - scale[0])
        max_keep = int(grid * grid * s)
        a = aspect[0] + r * (aspect[1] - aspect[0])
        h = int(round(math.sqrt(max_keep * a)))
        w = int(round(math.sqrt(max_keep / a)))
        return min(h, grid - 1), min(w, grid - 1)

    def block(size, acceptable=None):
        h, w = size
        tries, timeout = 0, 20
        while True:
            top = torch.randint(0, grid - h, (1,), generator=gen).item()
            left = torch.randint(0, grid - w, (1,), generator=gen).item()
            m = torch.zeros((grid, grid), dtype=torch.int32)
            m[top:top + h, left:left + w] = 1
            if acceptable is not None:
                for k in range(max(len(acceptable) - tries, 0)):
                    m *= acceptable[k]
            idx = torch.nonzero(m.flatten()).squeeze(-1)
            if len(idx) > min_keep:
                comp = torch.ones((grid, grid), dtype=torch.int32)
                comp[top:top + h, left:left + w] = 0
                return idx, comp
            timeout -= 1
            if timeout == 0:
                tries, timeout = tries + 1, 20

    p_size = block_size((0.15, 0.2), (0.75, 1.5))
    e_size = block_size((0.85, 1.0), (1.0, 1.0))
    enc, pred = [], []
    for _ in range(batch):
        ps, comps = [], []
        for _ in range(4):
            idx, comp = block(p_size)
            ps.append(idx)
            comps.append(comp)
        pred.append(ps)
        enc.append([block(e_size, comps)[0]])
    kp = min(len(m) for ms in pred for m in ms)
    ke = min(len(m) for ms in enc for m in ms)
    masks_pred = [torch.stack([pred[b][i][:kp] for b in range(batch)]) for i in range(4)]
    masks_enc = [torch.stack([enc[b][0][:ke] for b in range(batch)])]
    return masks_enc, masks_pred


def load_masks(path):
    with open(path) as f:
        data = json.load(f)
    steps = []
    for s in data["steps"]:
        enc = [torch.tensor(m, dtype=torch.int64) for m in s["enc"]]
        pred = [torch.tensor(m, dtype=torch.int64) for m in s["pred"]]
        steps.append((enc, pred))
    return data, steps


# ---- loss (src/train/loss.rs, C-JEPA defaults) ----

W_SIM, W_STD, W_COV = 0.001 * 25.0, 0.001 * 25.0, 0.001 * 1.0


def vicreg(z_c, z_t, var_eps=1e-4):
    b, d = z_c.shape
    sim = (z_c - z_t.detach()).pow(2).mean()
    zc = z_c - z_c.mean(0, keepdim=True)
    var = zc.pow(2).sum(0) / (b - 1)
    std = F.relu(1.0 - torch.sqrt(var + var_eps)).mean()
    cov = zc.t() @ zc / (b - 1)
    off = 1.0 - torch.eye(d)
    cov = (cov.pow(2) * off).sum() / d
    return sim, std, cov


def vm_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def main():
    a = ARGS
    torch.manual_seed(a.seed)
    if a.masks:
        data, mask_steps = load_masks(a.masks)
        c = dict(data["config"])
        # `batch_size` since the params' one vocabulary; files written before it say `batch`
        batch = data["batch_size"] if "batch_size" in data else data["batch"]
        model_name = "from " + os.path.basename(a.masks)
    else:
        c = dict(PRESETS[a.model])
        if a.img:
            c["img_size"] = a.img
        batch = a.batch
        grid = c["img_size"] // c["patch_size"]
        min_keep = min(10, (10 * grid * grid) // 196)
        gen = torch.Generator()
        gen.manual_seed(a.seed)
        mask_steps = [sample_masks(gen, grid, batch, min_keep) for _ in range(a.warmup + a.steps)]
        model_name = a.model
    encoder = VisionTransformer(c)
    predictor = Predictor(c)
    target = VisionTransformer(c)
    target.load_state_dict(encoder.state_dict())
    for p in target.parameters():
        p.requires_grad = False
    groups = [
        {"params": [p for n, p in list(encoder.named_parameters()) + list(predictor.named_parameters())
                    if p.requires_grad and "bias" not in n and len(p.shape) != 1]},
        {"params": [p for n, p in list(encoder.named_parameters()) + list(predictor.named_parameters())
                    if p.requires_grad and ("bias" in n or len(p.shape) == 1)],
         "WD_exclude": True, "weight_decay": 0},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-4, weight_decay=0.04)
    momentum = 0.996
    imgs = torch.randn(batch, c.get("in_chans", 3), c["img_size"], c["img_size"])
    nsteps = a.warmup + a.steps
    # the same peak-memory window as the Rust bench: from after the setup on
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    rss_setup = vm_kib("VmRSS")
    print(f"torch {torch.__version__}: model {model_name} (D {c['embed_dim']}, depth {c['depth']}, "
          f"predictor {c['pred_embed_dim']}x{c['pred_depth']}), {c['img_size']} px, patch "
          f"{c['patch_size']}, batch {batch}, {torch.get_num_threads()} threads, attention {a.attn}, "
          f"{a.steps} timed steps after {a.warmup} warm-up")
    names = ["target forward", "context forward", "predictor forward", "loss", "backward",
             "optimizer", "ema"]
    phases = [0.0] * len(names)
    walls, cpus = [], []
    for i in range(nsteps):
        masks_enc, masks_pred = mask_steps[i % len(mask_steps)]
        t = [time.perf_counter()]
        c0 = time.process_time()
        with torch.no_grad():
            h = target(imgs)
            h = F.layer_norm(h, (h.size(-1),))
            z_t = h.mean(1)
            B = len(h)
            h = apply_masks(h, masks_pred)
            h = repeat_interleave_batch(h, B, repeat=len(masks_enc))
        t.append(time.perf_counter())
        z = encoder(imgs, masks_enc)
        t.append(time.perf_counter())
        pred = predictor(z, masks_enc, masks_pred)
        t.append(time.perf_counter())
        jepa = F.smooth_l1_loss(pred, h)
        z_c = z.reshape(len(masks_enc), B, z.size(1), z.size(2)).mean(2).mean(0)
        sim, std, cov = vicreg(z_c, z_t)
        loss = jepa + W_SIM * sim + W_STD * std + W_COV * cov
        loss_v = loss.item()
        t.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())
        with torch.no_grad():
            for q, k in zip(encoder.parameters(), target.parameters()):
                k.data.mul_(momentum).add_((1.0 - momentum) * q.detach().data)
        t.append(time.perf_counter())
        dt, dc = t[-1] - t[0], time.process_time() - c0
        timed = i >= a.warmup
        print(f"  torch step {i}{'' if timed else ' (warm-up)'}: {dt:.3f} s wall, {dc:.3f} s cpu, "
              f"loss {loss_v:.5f}", file=sys.stderr)
        if timed:
            walls.append(dt)
            cpus.append(dc)
            for j in range(len(names)):
                phases[j] += t[j + 1] - t[j]
    wall = sum(walls) / len(walls)
    cpu = sum(cpus) / len(cpus)
    peak = vm_kib("VmHWM") if reset else None
    peak_mib = peak / 1024 if peak else float("nan")
    print(f"  torch: {wall:.3f} s/step wall ({batch / wall:.2f} images/s), {cpu:.3f} s/step cpu, "
          f"peak RSS {peak_mib:.0f} MiB (RSS after setup {rss_setup / 1024:.0f} MiB)")
    print("    phases: " + ", ".join(f"{n} {1e3 * p / len(walls):.0f} ms" for n, p in zip(names, phases)))
    print(f"RESULT impl=torch-{a.attn} images_per_s={batch / wall:.4f} s_per_step={wall:.4f} "
          f"cpu_s_per_step={cpu:.4f} peak_rss_mib={peak_mib:.1f} threads={torch.get_num_threads()}")


# ---- trajectory mode: the official train.py loop on a replayed run ----

class WarmupCosineSchedule:
    """src/utils/schedulers.py of the official code."""

    def __init__(self, optimizer, warmup_steps, start_lr, ref_lr, T_max, final_lr=0.):
        self.optimizer = optimizer
        self.start_lr = start_lr
        self.ref_lr = ref_lr
        self.final_lr = final_lr
        self.warmup_steps = warmup_steps
        self.T_max = T_max - warmup_steps
        self._step = 0.

    def step(self):
        self._step += 1
        if self._step < self.warmup_steps:
            progress = float(self._step) / float(max(1, self.warmup_steps))
            new_lr = self.start_lr + progress * (self.ref_lr - self.start_lr)
        else:
            progress = float(self._step - self.warmup_steps) / float(max(1, self.T_max))
            new_lr = max(self.final_lr,
                         self.final_lr + (self.ref_lr - self.final_lr) * 0.5 * (1. + math.cos(math.pi * progress)))
        for group in self.optimizer.param_groups:
            group["lr"] = new_lr
        return new_lr


class CosineWDSchedule:
    """src/utils/schedulers.py of the official code."""

    def __init__(self, optimizer, ref_wd, T_max, final_wd=0.):
        self.optimizer = optimizer
        self.ref_wd = ref_wd
        self.final_wd = final_wd
        self.T_max = T_max
        self._step = 0.

    def step(self):
        self._step += 1
        progress = self._step / self.T_max
        new_wd = self.final_wd + (self.ref_wd - self.final_wd) * 0.5 * (1. + math.cos(math.pi * progress))
        if self.final_wd <= self.ref_wd:
            new_wd = max(self.final_wd, new_wd)
        else:
            new_wd = min(self.final_wd, new_wd)
        for group in self.optimizer.param_groups:
            if ("WD_exclude" not in group) or not group["WD_exclude"]:
                group["weight_decay"] = new_wd
        return new_wd


def load_safetensors(path):
    """The tensors of a safetensors file (read with numpy: no extra package)."""
    import struct
    import numpy as np
    kinds = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64,
             "U32": np.uint32, "U8": np.uint8}
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        arr = np.frombuffer(data[8 + n + a:8 + n + b], dtype=kinds[v["dtype"]]).reshape(v["shape"])
        out[k] = torch.from_numpy(arr.copy())
    return out


def load_net(net, weights, prefix):
    """Loads `prefix.*` into `net`; only the fixed sin-cos tables may be absent."""
    sd = {k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(prefix + ".")}
    missing, unexpected = net.load_state_dict(sd, strict=False)
    bad = [m for m in missing if not m.endswith("pos_embed")]
    if bad or unexpected:
        sys.exit(f"torch_step.py: {prefix}: missing {bad}, unexpected {unexpected}")


def norm(tensors):
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


def write_trajectory(path, method, records):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps({"source": f"pytorch {torch.__version__}, official ijepa train.py loop",
                            "method": method})[:-1] + ', "steps": [\n')
        f.write(",\n".join(json.dumps(x) for x in records))
        f.write("\n]}\n")
    os.replace(tmp, path)


def replay_main():
    import numpy as np
    a = ARGS
    if not a.out:
        sys.exit("torch_step.py: --replay needs --out FILE")
    with open(os.path.join(a.replay, "replay.json")) as f:
        r = json.load(f)
    c = dict(r["model"])
    encoder, predictor, target = VisionTransformer(c), Predictor(c), VisionTransformer(c)
    w = load_safetensors(os.path.join(a.replay, r["init"]))
    load_net(encoder, w, "encoder")
    load_net(predictor, w, "predictor")
    load_net(target, w, "target_encoder")
    for p in target.parameters():
        p.requires_grad = False

    # src/helper.py::init_opt
    s = r["schedule"]
    ipe, num_epochs, ipe_scale = r["iterations_per_epoch"], r["epochs"], s["ipe_scale"]
    param_groups = [
        {"params": (p for n, p in encoder.named_parameters()
                    if ("bias" not in n) and (len(p.shape) != 1))},
        {"params": (p for n, p in predictor.named_parameters()
                    if ("bias" not in n) and (len(p.shape) != 1))},
        {"params": (p for n, p in encoder.named_parameters()
                    if ("bias" in n) or (len(p.shape) == 1)), "WD_exclude": True, "weight_decay": 0},
        {"params": (p for n, p in predictor.named_parameters()
                    if ("bias" in n) or (len(p.shape) == 1)), "WD_exclude": True, "weight_decay": 0},
    ]
    adam = r["adamw"]
    optimizer = torch.optim.AdamW(param_groups, betas=(adam["beta1"], adam["beta2"]), eps=adam["eps"])
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=int(s["warmup_epochs"] * ipe),
                                     start_lr=s["start_lr"], ref_lr=s["ref_lr"], final_lr=s["final_lr"],
                                     T_max=int(ipe_scale * num_epochs * ipe))
    wd_scheduler = CosineWDSchedule(optimizer, ref_wd=s["ref_wd"], final_wd=s["final_wd"],
                                    T_max=int(ipe_scale * num_epochs * ipe))
    ema = s["ema"]
    # src/train.py
    momentum_scheduler = (ema[0] + i * (ema[1] - ema[0]) / (ipe * num_epochs * ipe_scale)
                          for i in range(int(ipe * num_epochs * ipe_scale) + 1))

    L = r["loss"]
    if L["kind"] != "smooth_l1" or L["smooth_l1_beta"] != 1.0 or L["target_ln_eps"] != 1e-5:
        sys.exit(f"torch_step.py: loss {L} is not the official smooth-L1 with LayerNorm eps 1e-5")
    w_sim, w_std, w_cov = L["w_sim"], L["w_std"], L["w_cov"]
    shape = r["batch_shape"]
    per_step = int(np.prod(shape))
    images = np.memmap(os.path.join(a.replay, r["images"]), dtype="<f4", mode="r")
    steps = r["steps"]
    if images.size != steps * per_step:
        sys.exit(f"torch_step.py: {r['images']} holds {images.size} values, expected {steps} x {per_step}")
    online = list(encoder.named_parameters()) + list(predictor.named_parameters())
    fixed = lambda n: n.endswith("pos_embed")  # noqa: E731
    print(f"torch {torch.__version__}: replaying {steps} steps of {r['method']} from {a.replay}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    records = []
    for itr in range(steps):
        imgs = torch.from_numpy(np.array(images[itr * per_step:(itr + 1) * per_step])).reshape(shape)
        m = r["masks"][itr]
        masks_enc = [torch.tensor(x, dtype=torch.int64) for x in m["enc"]]
        masks_pred = [torch.tensor(x, dtype=torch.int64) for x in m["pred"]]
        _new_lr = scheduler.step()
        _new_wd = wd_scheduler.step()
        with torch.no_grad():
            h = target(imgs)
            h = F.layer_norm(h, (h.size(-1),))
            z_t = h.mean(1)
            B = len(h)
            h = apply_masks(h, masks_pred)
            h = repeat_interleave_batch(h, B, repeat=len(masks_enc))
            target_std = float(z_t.std(0).mean())
        z = encoder(imgs, masks_enc)
        pred = predictor(z, masks_enc, masks_pred)
        jepa = F.smooth_l1_loss(pred, h)
        z_c = z.reshape(len(masks_enc), B, z.size(1), z.size(2)).mean(2).mean(0)
        sim, std, cov = vicreg(z_c, z_t, L["var_eps"])
        loss = jepa
        for wt, t in ((w_sim, sim), (w_std, std), (w_cov, cov)):
            if wt != 0.0:
                loss = loss + wt * t
        loss.backward()
        grad_norm = norm([p.grad for _, p in online if p.grad is not None])
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            mom = next(momentum_scheduler)
            for param_q, param_k in zip(encoder.parameters(), target.parameters()):
                param_k.data.mul_(mom).add_((1. - mom) * param_q.detach().data)
        rec = {
            "step": itr + 1, "loss": loss.item(), "loss_jepa": jepa.item(), "loss_sim": sim.item(),
            "loss_std": std.item(), "loss_cov": cov.item(), "target_std": target_std,
            "lr": _new_lr, "wd": _new_wd, "momentum": mom, "grad_norm": grad_norm,
            "param_norm_encoder": norm([p for n, p in encoder.named_parameters() if not fixed(n)]),
            "param_norm_predictor": norm([p for n, p in predictor.named_parameters() if not fixed(n)]),
            "param_norm_target": norm([p for n, p in target.named_parameters() if not fixed(n)]),
        }
        records.append(rec)
        if itr == 0 or (itr + 1) % 25 == 0:
            print(f"  step {itr + 1:>3}: loss {rec['loss']:.6f} (jepa {rec['loss_jepa']:.6f}) "
                  f"target_std {target_std:.5f} lr {_new_lr:.3e} grad_norm {grad_norm:.4f}", file=sys.stderr)
        if (itr + 1) % 10 == 0 or itr + 1 == steps:
            # rewritten as the run goes: an interrupted run leaves its first steps
            write_trajectory(a.out, r["method"], records)
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    if ARGS.replay:
        replay_main()
    else:
        main()
