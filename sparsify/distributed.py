"""Calibration across `torch.distributed` ranks: reduce the search's sums, agree on one strategy, fail together.

sparsify's calibration statistics are sums over batches (block-pooled attention mass and the
rows it covers, per-candidate squared errors, kept mass and output norms), so a data-parallel
calibration all-reduces them and every rank then makes the same deterministic choices. What
"the same as one process" means exactly:

* **The union** of the ranks' calibration data is the rank-major concatenation of their batch
  lists: rank 0's batches, then rank 1's, and so on. Global batch ``i`` is batch
  ``i - offset(r)`` of the rank ``r`` that holds it. The profile / held-out split, the dense
  warm-up steps and the random row sampling are decided on these global indices, so a search
  over ``W`` ranks equals (up to the order of floating-point sums) a search of one process on
  the union.
* The sites (their capture lengths) are rank 0's, as a single process captures with the
  union's first batch. Every rank must capture the same sites with the same options.
* Each site's profile keeps the longest sequence seen anywhere (ties broken by the longer query
  side); ranks that saw it contribute their sums, the others zeros.
* Rank 0's strategy is the strategy of every rank (the others compute the same one; a rank
  whose own result differs logs a warning and adopts rank 0's).

Failures: a rank that raises anywhere inside a guarded region (`CalibrationGroup.guard`) does
not leave the others blocked in a collective. Every collective of this module starts with an
all-reduced failure flag; the failing rank contributes to that flag from its guard's exit, the
ranks gather each other's messages, and every rank raises the same
`DistributedCalibrationError` naming the failing ranks and their original errors. All ranks
therefore run the same sequence of collectives, whatever fails where; a rank that dies outright
(killed, out of memory inside a collective) is caught by the process group's own timeout. Ranks
also wait at each reduction for the slowest rank, so that timeout (``init_process_group(...,
timeout=)``; NCCL's default is 10 minutes) must exceed the imbalance of the longest phase
(profiling or scoring a rank's shard).

Only `torch.distributed` moves data (gloo on CPU, NCCL on GPU); nothing here opens sockets or
files, and nothing is pickled: small documents travel as JSON bytes in ``uint8`` tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from sparsify.errors import SparsifyError

if TYPE_CHECKING:
    from sparsify.patterns import Pattern
    from sparsify.profile import BlockMassProfile, CandidateErrors
    from sparsify.site import AttentionSite
    from sparsify.strategy import Strategy

logger = logging.getLogger(__name__)

# Tensors are summed in flat buckets of at most this many bytes (one collective per bucket).
BUCKET_BYTES = 64 * 2**20
# Each rank's error message is cut to this many characters in the shared report.
MAX_MESSAGE_CHARS = 2000


class DistributedCalibrationError(SparsifyError):
    """Calibration failed on one or more ranks; raised on every rank, naming the failing ones.

    Attributes:
        failures: ``{rank: "ErrorType: message"}`` of the ranks that failed.
    """

    def __init__(self, message: str, failures: dict[int, str] | None = None):
        super().__init__(message)
        self.failures = dict(failures or {})


@dataclasses.dataclass(frozen=True)
class BatchShard:
    """Where this rank's calibration batches sit in the union (the rank-major concatenation).

    Example:
        >>> shard = BatchShard(rank=1, counts=(3, 2))
        >>> shard.offset, shard.total, shard.local([0, 2, 3, 4])
        (3, 5, [0, 1])
    """

    rank: int
    counts: tuple[int, ...]

    @property
    def offset(self) -> int:
        """Global index of this rank's first batch."""
        return sum(self.counts[:self.rank])

    @property
    def count(self) -> int:
        """Batches on this rank."""
        return self.counts[self.rank]

    @property
    def total(self) -> int:
        """Batches of the union."""
        return sum(self.counts)

    def local(self, global_indices: Sequence[int]) -> list[int]:
        """The global indices that this rank holds, as indices into its own batch list."""
        return [index - self.offset for index in global_indices if self.offset <= index < self.offset + self.count]


def contiguous_shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Rank ``rank``'s contiguous share of ``items``; the shards concatenated in rank order are ``items``.

    The first ``len(items) % world_size`` ranks get one item more. Refuses a split that would
    leave a rank without items (every rank needs a batch to capture the model with).

    Example:
        >>> [contiguous_shard(list(range(5)), rank, 2) for rank in range(2)]
        [[0, 1, 2], [3, 4]]
    """
    items = list(items)
    if not 0 <= rank < world_size:
        raise SparsifyError(f"rank {rank} is not in [0, {world_size})")
    if len(items) < world_size:
        raise SparsifyError(f"{len(items)} calibration batches cannot be split over {world_size} ranks: every rank needs "
                            f"at least one; give at least {world_size} batches or use fewer processes")
    base, extra = divmod(len(items), world_size)
    start = rank * base + min(rank, extra)
    return items[start:start + base + (1 if rank < extra else 0)]


class CalibrationGroup:
    """The ranks that calibrate together, and every collective the search needs.

    Build it with `calibration_group`. Without a process group (a single process) every method
    is the identity, so the search runs one code path either way.

    Example:
        >>> group = calibration_group(False)         # this process alone
        >>> group.is_distributed, group.rank, group.world_size
        (False, 0, 1)
        >>> group.sum_floats([1.5, 2.0])
        [1.5, 2.0]
    """

    def __init__(self, process_group: Any = None, *, distributed: bool):
        self.process_group = process_group
        self.is_distributed = distributed
        if distributed:
            import torch.distributed as dist

            self.rank = dist.get_rank(process_group)
            self.world_size = dist.get_world_size(process_group)
        else:
            self.rank, self.world_size = 0, 1
        self._depth = 0  # nested guards: only the outermost closes with a final check
        self._broken = False  # a collective itself failed: no further collectives
        self._last_step = "start"

    def __repr__(self) -> str:
        if not self.is_distributed:
            return "CalibrationGroup(local)"
        return f"CalibrationGroup(rank {self.rank} of {self.world_size}, backend {self._backend()!r})"

    @property
    def is_main(self) -> bool:
        """True on the rank that writes files and shows progress (rank 0)."""
        return self.rank == 0

    # -- failures ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def guard(self, what: str = "calibration") -> Iterator[None]:
        """Run a region in which an error on any rank makes every rank raise `DistributedCalibrationError`.

        The outermost guard ends with one more failure check, so a rank that fails after the last
        collective is still reported to the others.

        Example:
            >>> with calibration_group(False).guard("profiling"):
            ...     pass
        """
        if not self.is_distributed:
            yield
            return
        self._depth += 1
        try:
            yield
        except DistributedCalibrationError:
            raise  # already agreed on by every rank
        except Exception as error:
            if self._broken:
                raise
            self._fail_together(error, what)
        else:
            if self._depth == 1:
                self._check_no_failure(f"the end of {what}")
        finally:
            self._depth -= 1

    def _check_no_failure(self, step: str) -> None:
        """Every collective starts here: all-reduce a failure flag; raise with everyone's messages if set."""
        import torch.distributed as dist

        flag = torch.zeros(1, dtype=torch.int32, device=self._device())
        self._run(step, lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.process_group))
        if int(flag.item()):
            self._raise_failures(None, step)
        self._last_step = step

    def _fail_together(self, error: Exception, what: str) -> None:
        import torch.distributed as dist

        flag = torch.ones(1, dtype=torch.int32, device=self._device())
        self._run(f"reporting a failure in {what}",
                  lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.process_group))
        self._raise_failures(error, what)

    def _raise_failures(self, error: Exception | None, where: str) -> None:
        message = None
        if error is not None:
            # torch.fx's interpreter appends the failing graph node to the message; the user's error is the first part.
            text = str(error).split("\n\nWhile executing %", 1)[0]
            message = f"{type(error).__name__}: {text}"[:MAX_MESSAGE_CHARS]
        reports = self._gather_json({"error": message, "where": where, "after": self._last_step}, "failure reports",
                                    check=False)
        failures = {rank: report["error"] for rank, report in enumerate(reports) if report["error"] is not None}
        lines = [f"  rank {rank} (in {reports[rank]['where']}, after {reports[rank]['after']!r}): {failures[rank]}"
                 for rank in failures]
        waiting = [rank for rank in range(self.world_size) if rank not in failures]
        if waiting:
            lines.append(f"  the other rank(s) {waiting} stopped at {reports[waiting[0]]['where']!r}")
        ranks = ", ".join(str(rank) for rank in failures)
        text = (f"calibration failed on rank {ranks} of {self.world_size} (this is rank {self.rank}); every rank "
                f"stops:\n" + "\n".join(lines))
        if error is not None:
            raise DistributedCalibrationError(text, failures) from error
        raise DistributedCalibrationError(text, failures)

    def _run(self, step: str, collective) -> Any:
        try:
            return collective()
        except Exception as error:  # noqa: BLE001 - the transport's own errors (timeouts, lost peers)
            self._broken = True
            raise DistributedCalibrationError(
                f"rank {self.rank} of {self.world_size}: the collective at {step!r} failed ({type(error).__name__}: "
                f"{str(error)[:MAX_MESSAGE_CHARS]}); another rank probably died or stopped calling sparsify in step "
                f"(every rank must run the same calibration code), or the process group timed out (its timeout must "
                f"exceed the longest wait for the slowest rank)"
            ) from error

    @contextlib.contextmanager
    def _committed(self, step: str) -> Iterator[None]:
        """After a passed failure check the ranks are inside one collective sequence: an error now cannot be
        reported to the others (they wait in a collective), so it marks the group broken instead."""
        try:
            yield
        except DistributedCalibrationError:
            raise
        except Exception as error:
            self._broken = True
            raise DistributedCalibrationError(
                f"rank {self.rank} of {self.world_size} failed in the middle of {step!r} ({type(error).__name__}: "
                f"{str(error)[:MAX_MESSAGE_CHARS]}); the other ranks wait until the process group times out"
            ) from error
        self._last_step = step

    # -- transport --------------------------------------------------------------------------------

    def _backend(self) -> str:
        import torch.distributed as dist

        return str(dist.get_backend(self.process_group))

    def _device(self) -> torch.device:
        """Where collective tensors live: the current CUDA device for NCCL, else the CPU."""
        backend = self._backend().lower()
        if "nccl" in backend and "cpu:" not in backend:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _gather_json(self, value: Any, step: str, *, check: bool = True) -> list[Any]:
        import torch.distributed as dist

        # Serialised before the check, so an error here is still reported to the others; repr() for odd option values.
        data = json.dumps(value, sort_keys=True, default=repr).encode("utf-8")
        if check:
            self._check_no_failure(step)
        with self._committed(step):
            device = self._device()
            length = torch.tensor([len(data)], dtype=torch.int64, device=device)
            lengths = [torch.zeros_like(length) for _ in range(self.world_size)]
            self._run(step, lambda: dist.all_gather(lengths, length, group=self.process_group))
            payload = _bytes_tensor(data, max(int(item) for item in lengths)).to(device)
            gathered = [torch.zeros_like(payload) for _ in range(self.world_size)]
            self._run(step, lambda: dist.all_gather(gathered, payload, group=self.process_group))
            return [json.loads(bytes(item[:int(size)].cpu().tolist()).decode("utf-8"))
                    for item, size in zip(gathered, lengths)]

    def _broadcast_json(self, value: Any, step: str) -> Any:
        """Rank 0's ``value`` on every rank (the others pass anything)."""
        import torch.distributed as dist

        data = json.dumps(value, sort_keys=True, allow_nan=False).encode("utf-8") if self.is_main else b""
        self._check_no_failure(step)
        with self._committed(step):
            device = self._device()
            source = dist.get_global_rank(self.process_group, 0) if self.process_group is not None else 0
            length = torch.tensor([len(data)], dtype=torch.int64, device=device)
            self._run(step, lambda: dist.broadcast(length, source, group=self.process_group))
            payload = _bytes_tensor(data, int(length.item())).to(device)
            self._run(step, lambda: dist.broadcast(payload, source, group=self.process_group))
            return json.loads(bytes(payload[:int(length.item())].cpu().tolist()).decode("utf-8"))

    def _sum_in_place(self, tensors: Sequence[torch.Tensor], step: str) -> None:
        """All-reduce (sum) ``tensors`` in place, in flat float64 buckets of at most `BUCKET_BYTES`."""
        import torch.distributed as dist

        buckets: list[list[torch.Tensor]] = [[]]
        size = 0
        for tensor in tensors:
            if size and size + tensor.numel() * 8 > BUCKET_BYTES:
                buckets.append([])
                size = 0
            buckets[-1].append(tensor)
            size += tensor.numel() * 8
        self._check_no_failure(step)
        with self._committed(step):
            device = self._device()
            for bucket in buckets:
                if not bucket:
                    continue
                flat = torch.cat([t.reshape(-1).to(torch.float64) for t in bucket]).to(device)
                self._run(step, lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group))
                flat = flat.cpu()
                position = 0
                for tensor in bucket:
                    tensor.copy_(flat[position:position + tensor.numel()].view(tensor.shape))
                    position += tensor.numel()

    # -- what the search calls --------------------------------------------------------------------

    def batch_shard(self, count: int, *, dense_steps: int = 0, steps_per_generation: int | None = None) -> BatchShard:
        """Every rank's batch count, so that global batch indices mean the same everywhere.

        With ``dense_steps``, a batch's generation step is its global index modulo
        ``steps_per_generation``; that equals its step in the rank's own loop only when every
        rank before the last calibrates on whole generations, so anything else is refused.

        Example:
            >>> calibration_group(False).batch_shard(4)
            BatchShard(rank=0, counts=(4,))
        """
        if not self.is_distributed:
            return BatchShard(0, (count,))
        counts = tuple(int(c) for c in self._gather_json(count, "counting calibration batches"))
        if dense_steps and self.world_size > 1:
            # Every rank sees the same counts, so every rank raises the same error.
            if steps_per_generation is None:
                raise DistributedCalibrationError(
                    f"dense_steps={dense_steps} over {self.world_size} ranks needs steps_per_generation: each rank "
                    f"runs its own generations, and the step of a calibration call must be known on every rank")
            partial = [rank for rank, c in enumerate(counts[:-1]) if c % steps_per_generation]
            if partial:
                raise DistributedCalibrationError(
                    f"rank(s) {partial} calibrate on {[counts[r] for r in partial]} calls, not a multiple of "
                    f"steps_per_generation={steps_per_generation}: give every rank whole generations so that step "
                    f"numbers agree across ranks (calls per rank: {list(counts)})")
        return BatchShard(self.rank, counts)

    def agree_on_sites(self, sites: Sequence["AttentionSite"], settings: dict[str, Any]) -> list["AttentionSite"]:
        """Check that every rank captured the same sites with the same search settings; return rank 0's sites.

        Rank 0's sites carry the lengths of the union's first batch, as one process would
        capture them. Raises `SparsifyError` on every rank, listing the differences, when ranks
        disagree (different models, options or sparsify versions).
        """
        from sparsify.site import AttentionSite

        if not self.is_distributed:
            return list(sites)
        mine = {"settings": settings, "sites": [site.to_dict() for site in sites]}
        everyone = self._gather_json(mine, "agreeing on sites and options")
        reference = everyone[0]

        def compared(document: dict[str, Any]) -> dict[str, Any]:
            # Capture lengths may differ (each rank captures with its own first batch).
            sites = [{k: v for k, v in site.items() if k not in ("q_len", "k_len")} for site in document["sites"]]
            return {"settings": document["settings"], "sites": sites}

        problems = []
        for rank, document in enumerate(everyone[1:], start=1):
            if compared(document) != compared(reference):
                problems.append(f"  rank {rank}: {_first_difference(compared(reference), compared(document))}")
        if problems:
            # Every rank sees the same gathered documents, so every rank raises this same error.
            raise DistributedCalibrationError(
                "the ranks do not calibrate the same thing (every rank must load the same model and pass the same "
                "options; only the calibration data differs):\n" + "\n".join(problems)
            )
        return [AttentionSite(**site) for site in reference["sites"]]

    def reduce_profiles(self, profiles: dict[str, "BlockMassProfile"], sites: Sequence["AttentionSite"],
                        block_size: int) -> dict[str, "BlockMassProfile"]:
        """Sum every site's block-mass profile over the ranks (see the module docstring for the lengths kept).

        Returns the reduced profiles (the same objects where this rank's lengths won); a site no
        rank profiled stays absent.
        """
        from sparsify.profile import BlockMassProfile

        if not self.is_distributed:
            return profiles
        shapes = [[profiles[s.name].q_len, profiles[s.name].k_len] if s.name in profiles else [0, 0] for s in sites]
        everyone = self._gather_json(shapes, "agreeing on profile lengths")
        reduced: dict[str, BlockMassProfile] = {}
        rows = []
        for index, site in enumerate(sites):
            q_len, k_len = max((tuple(shapes_of_rank[index]) for shapes_of_rank in everyone),
                               key=lambda shape: (shape[0] * shape[1], shape[0]))
            if q_len == 0:
                continue
            local = profiles.get(site.name)
            if local is None or (local.q_len, local.k_len) != (q_len, k_len):
                local = BlockMassProfile.empty(site.num_heads, q_len, k_len, block_size)
            reduced[site.name] = local
            rows.append(torch.tensor([float(local.rows)], dtype=torch.float64))
        self._sum_in_place([reduced[name].mass for name in reduced] + rows, "summing block-mass profiles")
        for (name, profile), count in zip(reduced.items(), rows):
            profile.rows = int(round(float(count)))
        return reduced

    def reduce_candidate_errors(self, scores: dict[str, "CandidateErrors"],
                                candidates: dict[str, list[list["Pattern"]]]) -> None:
        """Sum every site's candidate errors over the ranks, in place.

        First checks that every rank scored the same candidates (they are derived
        deterministically from the reduced profile; a difference is a bug and is reported).
        """
        if not self.is_distributed:
            return
        digests = {name: _candidate_digest(per_head) for name, per_head in candidates.items()}
        everyone = self._gather_json(digests, "agreeing on candidate patterns")
        different = sorted({name for other in everyone for name in other if other[name] != everyone[0].get(name)})
        if different:
            raise DistributedCalibrationError(f"the ranks generated different candidate patterns for site(s) {different} from the "
                                f"same reduced profile; this is a bug in sparsify, please report it")
        tensors: list[torch.Tensor] = []
        for name in candidates:
            errors = scores[name]
            tensors += [*errors.squared_error, *errors.kept_mass, errors.output_norm, errors.total_mass,
                        *errors.work_sum, *errors.work_square_sum, errors.work_count]
        self._sum_in_place(tensors, "summing candidate errors")

    def sum_floats(self, values: Sequence[float], step: str = "summing floats") -> list[float]:
        """``values`` summed over the ranks (the identity on one process)."""
        if not self.is_distributed:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
        self._sum_in_place([tensor], step)
        return tensor.tolist()

    def agree_on_strategy(self, strategy: "Strategy") -> "Strategy":
        """Rank 0's strategy on every rank; a rank whose own choice differs logs which sites differ."""
        from sparsify.strategy import Strategy

        if not self.is_distributed:
            return strategy
        document = self._broadcast_json(strategy.to_dict() if self.is_main else None, "sharing rank 0's strategy")
        if self.is_main:
            return strategy
        mine = strategy.to_dict()
        different = [name for name in document["sites"] if document["sites"][name] != mine["sites"].get(name)]
        if different:
            logger.warning("rank %d chose differently from rank 0 at site(s) %s (different hardware profiles or float "
                           "noise at a tie?); using rank 0's strategy", self.rank, different)
        return Strategy.from_dict(document, source="rank 0's strategy")


def calibration_group(process_group: Any = None) -> CalibrationGroup:
    """The ranks to calibrate with: ``process_group``, else the default group when one is initialised.

    ``process_group`` may be a ``torch.distributed`` process group, ``None`` (use the default
    group if ``torch.distributed`` is initialised, else calibrate alone), ``False`` (calibrate on
    this process's data alone even under an initialised group) or a `CalibrationGroup` (returned
    as it is).

    Example:
        >>> calibration_group(False).is_distributed
        False
    """
    if isinstance(process_group, CalibrationGroup):
        return process_group
    if process_group is False:
        return CalibrationGroup(distributed=False)
    available = torch.distributed.is_available()
    if process_group is None:
        if available and torch.distributed.is_initialized():
            return CalibrationGroup(None, distributed=True)
        return CalibrationGroup(distributed=False)
    if not (available and torch.distributed.is_initialized()):
        raise SparsifyError("a process_group was given but torch.distributed is not initialised; call "
                            "torch.distributed.init_process_group(...) first (torchrun sets up its environment)")
    return CalibrationGroup(process_group, distributed=True)


def is_main_process(process_group: Any = None) -> bool:
    """True unless this process is a rank other than 0 of an initialised process group.

    Use it to write files once in a data-parallel script.

    Example:
        >>> if is_main_process():
        ...     pass  # strategy.save("strategy.json")
    """
    return calibration_group(process_group).is_main


def init_from_environment(backend: str = "auto", *, prefer_cuda: bool = False,
                          timeout: datetime.timedelta | None = None) -> bool:
    """Initialise the default process group from a launcher's environment (``torchrun``); True when it did.

    Does nothing (returns False) when ``WORLD_SIZE`` is not set or a group is already
    initialised. ``backend="auto"`` picks NCCL when ``prefer_cuda`` and CUDA is available (and
    makes ``LOCAL_RANK`` the current CUDA device), else gloo.

    Example:
        >>> init_from_environment()   # doctest: +SKIP
        True
    """
    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ or not dist.is_available() or dist.is_initialized():
        return False
    if backend == "auto":
        backend = "nccl" if prefer_cuda and torch.cuda.is_available() else "gloo"
    if "nccl" in backend:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    options = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend, **options)
    return True


def _bytes_tensor(data: bytes, length: int) -> torch.Tensor:
    """``data`` zero-padded to ``length`` bytes (at least one) as a ``uint8`` tensor."""
    payload = torch.zeros(max(length, 1), dtype=torch.uint8)
    if data:
        payload[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return payload


def _candidate_digest(per_head: list[list["Pattern"]]) -> str:
    text = json.dumps([[pattern.to_dict() for pattern in head] for head in per_head], sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _first_difference(expected: Any, got: Any, where: str = "") -> str:
    """A short description of the first place two JSON values differ."""
    if isinstance(expected, dict) and isinstance(got, dict):
        for key in list(expected) + [k for k in got if k not in expected]:
            if key not in got:
                return f"{where}.{key} missing (rank 0: {expected[key]!r})"
            if key not in expected:
                return f"{where}.{key}={got[key]!r} (rank 0 has none)"
            if expected[key] != got[key]:
                return _first_difference(expected[key], got[key], f"{where}.{key}")
    if isinstance(expected, list) and isinstance(got, list):
        if len(expected) != len(got):
            return f"{where or 'value'} has {len(got)} entries, rank 0 has {len(expected)}"
        for index, (a, b) in enumerate(zip(expected, got)):
            if a != b:
                return _first_difference(a, b, f"{where}[{index}]")
    return f"{where.lstrip('.') or 'value'} is {got!r}, rank 0 has {expected!r}"
