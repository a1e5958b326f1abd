"""Several processes, one run: `torchrun --nproc-per-node N [--nnodes M ...] -m moecompress quantize ...`.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `from_env` joins the process group (NCCL for CUDA
devices, gloo for the CPU) and gives each process its device (cuda:LOCAL_RANK with --device auto/cuda).
A single process gets a `Dist` of world size 1 whose collectives do nothing.

Byte identity with one process is the design goal, so nothing is summed by a collective (an all-reduce
adds in an order that depends on the number of ranks, and GPTQ amplifies the last bit). Instead:
- the calibration windows are split across ranks in whole micro-batches (data parallel for the decoder
  layer's forward), and what each micro-batch leaves in the MoE cache is broadcast from the rank that
  computed it, so every rank holds the same cache, bit for bit;
- each layer's experts are split across ranks in whole GPTQ groups (expert parallel): an expert's
  Hessian is summed by its owner from the cache in window order, exactly as one process sums it;
- results travel as raw bytes (`broadcast_tensors`), so they arrive bit-identical.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch

from .errors import MoeCompressError

log = logging.getLogger("moecompress")
_ALIGN = 16  # bytes: every tensor in a broadcast buffer starts aligned, so views of any dtype are valid


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where collectives' buffers live (NCCL: the GPU)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist
            dist.barrier()

    def split(self, n: int) -> list[range]:
        """n items (micro-batches, expert groups) in contiguous blocks, one per rank, in rank order."""
        base, extra = divmod(n, self.world)
        out, s = [], 0
        for r in range(self.world):
            k = base + (r < extra)
            out.append(range(s, s + k))
            s += k
        return out

    def mine(self, n: int) -> range:
        return self.split(n)[self.rank]

    def owner_of(self, n: int) -> list[int]:
        """Item -> rank that owns it, for n items split as `split` does."""
        own = [0] * n
        for r, rg in enumerate(self.split(n)):
            for i in rg:
                own[i] = r
        return own

    def broadcast_tensors(self, tensors: dict[str, torch.Tensor] | None, src: int) -> dict[str, torch.Tensor]:
        """Send {name: tensor} from rank `src` to every rank, bit for bit (any dtypes and shapes); the
        other ranks pass None and receive the dict, on the CPU."""
        if not self.active:
            return tensors or {}
        if self.rank == src:
            header, body = _pack(tensors)
            sizes = torch.tensor([header.numel(), body.numel()], dtype=torch.int64)
        else:
            sizes = torch.zeros(2, dtype=torch.int64)
        sizes = self._bcast(sizes, src)
        if self.rank != src:
            header = torch.empty(int(sizes[0]), dtype=torch.uint8)
            body = torch.empty(int(sizes[1]), dtype=torch.uint8)
        header = self._bcast(header, src)
        body = self._bcast(body, src)
        return tensors if self.rank == src else _unpack(header, body)

    def gather_to_main(self, mine: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Every rank's dict merged on rank 0 (point to point: the other ranks keep no copy); None elsewhere."""
        if not self.active:
            return dict(mine)
        import torch.distributed as dist
        if not self.main:
            header, body = _pack(mine)
            for t in (torch.tensor([header.numel(), body.numel()], dtype=torch.int64), header, body):
                if t.numel():
                    dist.send(t.to(self.device) if self.device.type == "cuda" else t, 0)
            return None
        out = dict(mine)
        for r in range(1, self.world):
            sizes = self._recv(torch.zeros(2, dtype=torch.int64), r)
            header = self._recv(torch.empty(int(sizes[0]), dtype=torch.uint8), r)
            body = self._recv(torch.empty(int(sizes[1]), dtype=torch.uint8), r)
            out.update(_unpack(header, body))
        return out

    def _recv(self, t: torch.Tensor, src: int) -> torch.Tensor:
        import torch.distributed as dist
        if t.numel() == 0:
            return t
        buf = t.to(self.device) if self.device.type == "cuda" else t
        dist.recv(buf, src)
        return buf.cpu()

    def _bcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        import torch.distributed as dist
        if t.numel() == 0:
            return t
        buf = t.to(self.device) if self.device.type == "cuda" else t
        dist.broadcast(buf, src)
        return buf.cpu() if buf is not t else buf

    def gather_dicts(self, mine: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every rank's dict, merged on every rank (each rank broadcasts its own in turn, in rank order)."""
        if not self.active:
            return dict(mine)
        out: dict[str, torch.Tensor] = {}
        for r in range(self.world):
            out.update(self.broadcast_tensors(mine if r == self.rank else None, r))
        return out


def _pack(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """{name: tensor} -> (JSON header, body) as uint8 tensors on the CPU: every tensor's raw bytes, aligned."""
    parts, meta, off = [], [], 0
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        b = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        pad = (-off) % _ALIGN
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8))
            off += pad
        meta.append([k, str(t.dtype).removeprefix("torch."), list(t.shape), off, b.numel()])
        parts.append(b)
        off += b.numel()
    header = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
    return header, (torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8))


def _unpack(header: torch.Tensor, body: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for k, dt, shape, off, n in json.loads(bytes(header.numpy()).decode()):
        dtype = getattr(torch, dt)
        out[k] = (body[off:off + n].clone().view(dtype) if n else torch.empty(0, dtype=dtype)).reshape(shape)
    return out


def from_env(device_spec: str | None = "auto") -> tuple[Dist, torch.device]:
    """Join torchrun's process group when WORLD_SIZE > 1 -> (Dist, this process's device)."""
    from .device import resolve_device
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    device = resolve_device(device_spec, local)
    if world <= 1:
        return Dist(device=device), device
    import torch.distributed as dist
    rank = int(os.environ.get("RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend=backend)
        except Exception as e:  # noqa: BLE001 - the launcher's environment is the user's input
            raise MoeCompressError(f"torch.distributed ({backend}) could not start: {str(e).splitlines()[0][:160]}") from None
    if dist.get_world_size() != world:
        raise MoeCompressError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} ranks")
    log.info("rank %d of %d on %s", rank, world, device)
    return Dist(rank, world, local, device), device


def shutdown(d: Dist) -> None:
    if d.active:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
