"""Network -> Model: static buffers, parameter views, and the kernel calls of a
forward and backward pass.

Shapes are static once a spec is inferred, so every activation, gradient and
workspace buffer is allocated here, once per (spec, batch size); a training
step allocates nothing. Trainable parameters live in one flat array (and their
gradients in another), so an optimizer can update them in one vector operation;
`model.params` holds named views into that storage.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache, partial

import numpy as np

from .backend import Backend, StagedBatch, get_backend
from .errors import did_you_mean
from .graph import INPUT


@lru_cache(maxsize=1)
def blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@lru_cache(maxsize=1)
def blas_libraries() -> tuple:
    """threadpoolctl's controllers of the BLAS libraries loaded (numpy's)."""
    return tuple(lib for lib in blas_controller().lib_controllers if lib.user_api == "blas")


class computing:  # noqa: N801 (used as a function: `with computing():`)
    """How the model computes. Numba's kernels use every core other processes leave
    free (kernels/cpu/threads.py); OpenBLAS threads spinning beside them on the same
    cores slow a step down 5-20x (measured on 2 cores), so GEMMs run on the calling
    thread meanwhile. Overflow to inf/NaN is not an exception here: the trainer detects
    a non-finite loss and says so. A library already on one thread is left alone
    (threadpoolctl's `limit` re-reads every library each time: ~8 us of a LeNet-5 step).
    While parallel builds compile in the background, each computation's end asks whether
    any is still awaited (kernels/cpu/background.py). A class, not a generator, with its
    imports done once: ~13 -> ~6 us a call."""

    __slots__ = ("limited", "errors", "governed")
    _kernels = None  # (BACKGROUND, governed), imported on first use (they load Numba)

    def __enter__(self):
        if computing._kernels is None:
            from .kernels.cpu.background import BACKGROUND
            from .kernels.cpu.threads import governed

            computing._kernels = BACKGROUND, governed
        self.limited = [(lib, n) for lib in blas_libraries() if (n := lib.num_threads) != 1]
        for lib, _ in self.limited:
            lib.set_num_threads(1)
        self.errors = np.errstate(all="ignore")
        self.governed = computing._kernels[1]()
        self.errors.__enter__()
        try:
            self.governed.__enter__()
        except BaseException:
            self.errors.__exit__(None, None, None)
            self._restore()
            raise
        return self

    def __exit__(self, *exc):
        try:
            self.governed.__exit__(*exc)
            self.errors.__exit__(*exc)
        finally:
            self._restore()
            background = computing._kernels[0]
            if background.active:
                background.settle()

    def _restore(self):
        for lib, n in self.limited:
            lib.set_num_threads(n)


def fused_relus(infos, keep=frozenset()) -> dict:
    """ReLUs that run in the epilogue of the (fusable) layer before them (when that layer
    feeds nothing else and its output is not kept), sharing its buffers: relu name ->
    producer name."""
    users: dict[str, int] = {}
    for info in infos:
        for i in info.node.inputs:
            users[i] = users.get(i, 0) + 1
    by_name = {i.name: i for i in infos}
    fused = {}
    for info in infos:
        src = by_name.get(info.node.inputs[0]) if info.node.type == "relu" else None
        if src is not None and src.layer.fusable and users[src.name] == 1 and src.name not in keep:
            fused[info.name] = src.name
    return fused


def fusion_enabled() -> bool:
    """CNNSPEC_FUSION=0 turns off the fusions of batch norm into its neighbouring convs
    and the in-place gradient sums (A/B measurements, tests); ReLUs still fuse."""
    return os.environ.get("CNNSPEC_FUSION", "1") != "0"


def fused_norms(infos, relus: dict, keep=frozenset()) -> tuple[dict, dict]:
    """Batch norms fused into the layers beside them (the CPU kernels' hooks):
    - stats: norm -> the conv before it, which takes the batch statistics in its epilogue
      while its output tiles are in cache (the conv feeds nothing else);
    - applied: norm -> the convs and adds that apply its affine (and fused ReLU) as they
      read their input, when they are all that read it: the norm writes no output. Not
      when its output is kept or ends the network (what the scores read)."""
    users: dict[str, list] = {}
    for info in infos:
        for i in info.node.inputs:
            users.setdefault(i, []).append(info)
    by_name = {i.name: i for i in infos}
    relu_of = {p: r for r, p in relus.items()}

    def conv(info):
        return info is not None and info.node.type == "conv2d" and not info.layer.is_dense

    def applies(info):
        return conv(info) or info.node.type == "add"

    outputs = [i for i in infos if i.layer.role == "output"]
    ends = {n for i in [*outputs, (outputs or infos)[-1]] for n in (i.name, *i.node.inputs)}
    keep = set(keep)
    stats, applied = {}, {}
    for info in infos:
        if info.node.type != "batchnorm2d":
            continue
        name, src = info.name, by_name.get(info.node.inputs[0])
        if conv(src) and len(users[src.name]) == 1 and src.name not in keep:
            stats[name] = src.name
        out = relu_of.get(name, name)
        readers = users.get(out, [])
        ours = src is not None  # not the input: a staged batch replaces its buffer
        if ours and readers and all(map(applies, readers)) and not {name, out} & (keep | ends):
            applied[name] = [r.name for r in readers]
    return stats, applied


class _BufferPool:
    """Hands out zeroed arrays; one whose life ([first, last] backward steps) has
    ended before another's begins is handed out again, so gradients share memory."""

    def __init__(self, backend, dtype):
        self.zeros = backend.zeros
        self.dtype = dtype
        self.slots: dict[int, list] = {}  # size -> [[flat array, last step], ...]

    def get(self, shape, first, last):
        size = math.prod(shape)
        if first is None:  # never written: a private zero buffer
            return self.zeros(shape, self.dtype)
        for slot in self.slots.setdefault(size, []):
            if slot[1] < first:
                slot[1] = last
                return slot[0].reshape(shape)
        flat = self.zeros(size, self.dtype)
        self.slots[size].append([flat, last])
        return flat.reshape(shape)


def _root(shared: dict, name: str) -> str:
    """The end of a chain of shared gradient buffers: the one that is allocated."""
    while name in shared:
        name = shared[name]
    return name


class Model:
    trained_inputs = None  # the training data's range and scaling, once restored (predict, eval)
    # set by every loss_and_grads; declared here so the trainer knows from the first step that
    # it need not run an extra forward pass for the training accuracy
    last_scores: np.ndarray | None = None

    def __init__(
        self,
        net,
        batch_size: int = 32,
        seed: int = 0,
        dtype=np.float32,
        training: bool = True,
        device: str | Backend = "cpu",
        keep=(),
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.backend = get_backend(device) if isinstance(device, str) else device
        self.training = training  # False: forward only, activations share memory
        net = net.reshape(net.input_shape)  # fresh layer objects: they hold workspaces
        self.net = net
        self._by_name = {info.name: info for info in net.infos}
        for name in keep:
            self._info(name)
        # layers whose outputs forward(outputs=...) reads: their memory is their own,
        # and a ReLU after them does not run in place in it
        self.keep = set(keep)
        self._input_grad = False  # planned on input_gradient's first call
        self._sgd = None
        self._stager = None  # made by the first stage()
        self.batch_size = batch_size
        self.dtype = np.dtype(dtype)
        self.input_shape = tuple(net.input_shape)
        self.infos = net.infos
        self.outputs = [i for i in self.infos if i.layer.role == "output"]
        # the prediction: the last output layer (auxiliary heads come before it)
        self.head = self.outputs[-1] if self.outputs else self.infos[-1]
        # heads whose loss writes their output (a softmax's probabilities) and that no
        # layer reads: a training pass (loss_and_grads) skips their forward
        read = {i for info in self.infos for i in info.node.inputs}
        self._loss_writes = {
            i.name for i in self.outputs if i.layer.loss_writes_output and i.name not in read
        }
        self.num_outputs = int(np.prod(self.head.layer.out_shape))
        seeds = np.random.SeedSequence(seed).spawn(2)
        self.rng = np.random.default_rng(seeds[1])  # dropout, RReLU
        self._allocate(batch_size)
        self._init_params(np.random.default_rng(seeds[0]))

    # ---- construction ------------------------------------------------------
    def _allocate(self, batch):
        dt, zeros = self.dtype, self.backend.zeros
        for info in self.infos:
            info.layer.bind(self.backend)
        self._input = zeros((batch, *self.input_shape), dt)  # batches given as arrays
        self.buf = {INPUT: self._input}  # or a staged batch's slot
        self.fused = self._fuse_relus()
        self.relu_of = {p: r for r, p in self.fused.items()}  # producer -> its fused ReLU
        self.unwritten = self._fuse_norms()
        self._allocate_activations(batch)
        for info in self.infos:
            info.layer.allocate(batch, dt)
        self._bind_norms()
        scratch = zeros(max([i.layer.workspace_size(batch) for i in self.infos] + [1]), dt)
        for info in self.infos:
            info.layer.workspace = scratch
        defs = [(info, d) for info in self.infos for d in info.layer.param_defs()]
        n_train = sum(int(np.prod(d.shape)) for _, d in defs if d.trainable)
        n_fixed = sum(int(np.prod(d.shape)) for _, d in defs if not d.trainable)
        self.flat_params = zeros(n_train, dt)
        self.flat_grads = zeros(n_train, dt)
        self.flat_fixed = zeros(n_fixed, dt)
        self.params, self.grads, self.defs = {}, {}, {}
        self.layer_params = {i.name: {} for i in self.infos}
        self.layer_grads = {i.name: {} for i in self.infos}
        at_train = at_fixed = 0
        for info, d in defs:
            key = f"{info.name}.{d.name}"
            size = int(np.prod(d.shape))
            if d.trainable:
                p = self.flat_params[at_train : at_train + size].reshape(d.shape)
                g = self.flat_grads[at_train : at_train + size].reshape(d.shape)
                at_train += size
                self.grads[key] = self.layer_grads[info.name][d.name] = g
            else:
                p = self.flat_fixed[at_fixed : at_fixed + size].reshape(d.shape)
                at_fixed += size
            self.params[key] = self.layer_params[info.name][d.name] = p
            self.defs[key] = (info, d)
        self.trainable = set(self.grads)
        for conv, norm in self.folded.items():
            norm_layer = self._by_name[norm].layer
            self._by_name[conv].layer.fold_norm(norm_layer, self.layer_params[norm], dt)
        if self.training:
            self._plan_backward(batch)

    def _owner(self, name):
        """The layer whose buffer holds `name`'s output: a fused ReLU's producer, an
        unwritten norm's input (its readers apply it), a folded norm's conv in a
        forward-only model (the conv writes the norm's output), or itself."""
        while True:
            if name in self.fused:
                name = self.fused[name]
            elif name in self.unwritten or (not self.training and name in self.norm_stats):
                name = self._by_name[name].node.inputs[0]
            elif not self.training and name in self.eval_adds:
                name = self.eval_adds[name]
            else:
                return name

    def _allocate_activations(self, batch):
        """Training keeps every activation for the backward pass; inference lets an
        activation's memory go to a later layer once its last user has run."""
        order = {info.name: k for k, info in enumerate(self.infos)}
        end = len(self.infos)
        last = {}
        for info in self.infos:
            for i in info.node.inputs:
                owner = self._owner(i)
                last[owner] = max(last.get(owner, 0), order[info.name])
        for info in [*self.outputs, self.head]:  # scores read the heads and their inputs
            for name in (info.name, *info.node.inputs):
                last[self._owner(name)] = end
        for name in self.keep:
            last[self._owner(name)] = end
        pool = _BufferPool(self.backend, self.dtype)
        for info in self.infos:
            name = info.name
            if self._owner(name) != name:
                continue
            shape = (batch, *info.layer.out_shape)
            if self.training:
                self.buf[name] = self.backend.zeros(shape, self.dtype)
            else:
                self.buf[name] = pool.get(shape, order[name], last.get(name, end))
        for info in self.infos:  # fused ReLUs compute in place in their producer's buffer
            self.buf[info.name] = self.buf[self._owner(info.name)]

    def _fuse_relus(self) -> dict:
        fused = fused_relus(self.infos, self.keep)
        by_name = {i.name: i for i in self.infos}
        for producer in fused.values():
            by_name[producer].layer.fused_act = 1
        return fused

    def _fuse_norms(self) -> set:
        """Plans the batch norms fused into their neighbouring convs (CPU only: the hooks
        are the CPU kernels'); returns the norms that write no output."""
        self.norm_stats, self.norm_applied, self.folded = {}, {}, {}
        self.eval_adds, self.eval_residuals = {}, {}
        if self.backend.name != "cpu" or not fusion_enabled():
            return set()
        self.norm_stats, self.norm_applied = fused_norms(self.infos, self.fused, self.keep)
        # in eval mode a norm whose conv takes its statistics (the conv feeds only it) is
        # folded into the conv's weights: conv name -> norm name (see Conv2d.fold_norm)
        self.folded = {conv: norm for norm, conv in self.norm_stats.items()}
        self._fuse_eval_adds()
        return set(self.norm_applied)

    def _readers(self) -> dict[str, list[str]]:
        """Layer (or input) name -> the names of the layers that read it, in order."""
        users: dict[str, list[str]] = {}
        for info in self.infos:
            for i in info.node.inputs:
                users.setdefault(i, []).append(info.name)
        return users

    def _fuse_eval_adds(self):
        """In eval mode, a residual add of two inputs, one of them a batch norm folded
        into the conv before it and read by the add alone, runs in that conv's epilogue
        (conv2d_forward's `residual`): the conv writes the add's output, its ReLU too,
        and the add does not run. eval_adds: add -> conv; eval_residuals: conv -> (add,
        the other input). Only where the other input is computed before the conv runs
        (ResNet's identity shortcuts, not a shortcut listed after the conv), and is not
        a norm its readers apply (a hook of the add's)."""
        users = self._readers()
        order = {info.name: k for k, info in enumerate(self.infos)}
        hooked = {self.relu_of.get(n, n) for n in self.norm_applied if n not in self.norm_stats}
        for info in self.infos:
            inputs = info.node.inputs
            if info.node.type != "add" or len(inputs) != 2 or inputs[0] == inputs[1]:
                continue
            for norm, other in (inputs, inputs[::-1]):
                conv = self.norm_stats.get(norm)
                if (
                    conv is None
                    or norm in self.relu_of
                    or users[norm] != [info.name]
                    or {norm, conv} & self.keep
                    or other in hooked
                    or order.get(other, -1) > order[conv]
                ):
                    continue
                self.eval_adds[info.name] = conv
                self.eval_residuals[conv] = (info.name, other)
                self._by_name[conv].layer.residual_act = info.layer.fused_act
                break

    def _bind_norms(self):
        """Hands the fused norms' buffers to their convs (after the layers allocate)."""
        by_name = self._by_name
        for norm, conv in self.norm_stats.items():
            bn = by_name[norm].layer
            bn.stats = np.zeros((2, bn.in_shapes[0][0]))
            by_name[conv].layer.stats_out = bn.stats
        for norm, readers in self.norm_applied.items():
            bn = by_name[norm].layer
            bn.writes_out = False
            hook = (bn.affine[0], bn.affine[1], bn.fused_act)
            in_eval = None if norm in self.norm_stats else hook  # folded: the conv applied it
            for reader in readers:
                layer = by_name[reader].layer
                inputs = by_name[reader].node.inputs
                if by_name[reader].node.type == "add":  # per input
                    read = self.relu_of.get(norm, norm)
                    hooks = layer.in_affine or [None] * len(inputs)
                    evals = layer.in_affine_eval or [None] * len(inputs)
                    for k, i in enumerate(inputs):
                        hooks[k] = hook if i == read else hooks[k]
                        evals[k] = in_eval if i == read else evals[k]
                    layer.in_affine = hooks
                    layer.in_affine_eval = evals if any(h is not None for h in evals) else None
                else:
                    layer.in_affine, layer.in_affine_eval = hook, in_eval

    def _plan_backward(self, batch):
        """Gradient buffers. A layer writes d(input) straight into its producer's
        gradient when it is the producer's only user, or the first of several to run
        backward; a later one adds into it in place if it can (a conv, CPU), else writes
        a buffer of its own that the producer adds up. A gradient lives from its first
        write to its layer's backward step; buffers whose lives do not overlap share
        memory."""
        users = self._readers()
        needs_grad = {INPUT: self._input_grad}
        for info in self.infos:
            has_params = bool(self.layer_grads[info.name])
            needs_grad[info.name] = has_params or any(needs_grad[i] for i in info.node.inputs)
        self.needs_grad = needs_grad
        step = {info.name: k for k, info in enumerate(reversed(self.infos))}  # backward order
        step[INPUT] = len(self.infos)
        shapes = {info.name: (batch, *info.layer.out_shape) for info in self.infos}
        pool = _BufferPool(self.backend, self.dtype)
        in_place = self.backend.name == "cpu" and fusion_enabled()
        # a norm after a conv hands the conv its output gradient and the coefficients
        # that make it the norm's input gradient: the conv applies them as it reads it
        by_conv = {conv: norm for norm, conv in self.norm_stats.items()}
        for norm, conv in self.norm_stats.items():
            bn, layer = self._by_name[norm].layer, self._by_name[conv].layer
            bn.dx_in_producer = True
            layer.dout_affine = (bn.dx_coeffs, bn.affine, bn.fused_act)
        # the step at which a gradient is last read: its layer's, or its norm's conv's
        read = {name: step[self.norm_stats.get(name, name)] for name in step}
        shared = self._shared_add_gradients(users, needs_grad, step, read) if in_place else {}
        self._pass_through_adds(users, needs_grad, step, read, shared, in_place)
        shared = {name: _root(shared, name) for name in shared}
        for name, owner in shared.items():
            read[owner] = max(read[owner], read[name])
        # (first write, last read, name): a fused ReLU's gradient is its producer's
        lives = []
        for info in self.infos:
            name = info.name
            if name in self.fused or name in by_conv or name in shared:
                continue
            relu = self.relu_of.get(name)
            writers = users.get(relu or name, [])
            if not writers or not needs_grad[name]:
                lives.append((None, None, name))  # never written: stays zero
                continue
            lives.append((min(step[w] for w in writers), read[name], name))
        self.dbuf = {INPUT: self.backend.zeros((batch, *self.input_shape), self.dtype)}
        for first, last, name in sorted(lives, key=lambda t: (t[0] is not None, t[0] or 0)):
            self.dbuf[name] = pool.get(shapes[name], first, last)
        for name, owner in shared.items():
            self.dbuf[name] = self.dbuf[owner]
        for conv, norm in by_conv.items():
            self.dbuf[conv] = self.dbuf[norm]
        for relu, producer in self.fused.items():
            self.dbuf[relu] = self.dbuf[producer]  # the producer applies the ReLU mask
        self.dx_targets = {}  # layer name -> list of arrays (or None) for its inputs
        self.fan_in_sums = {}  # gradient -> the buffers that add up to it (itself first)
        planned, direct = set(), set()  # gradients with a writer / written in place
        for info in reversed(self.infos):  # by first write, as the pool wants
            targets = []
            layer = info.layer
            layer.accumulate_dx = False
            for i in info.node.inputs:
                once = info.node.inputs.count(i) == 1
                if not needs_grad[i] or i in by_conv:  # by_conv: the conv applies it
                    targets.append(None)
                elif len(users[i]) == 1 or (in_place and once and i not in planned):
                    direct.add(i)
                    targets.append(self.dbuf[i])
                elif i in direct and once and info.node.type == "conv2d" and not layer.is_dense:
                    layer.accumulate_dx = True  # adds to what the readers after it wrote
                    targets.append(self.dbuf[i])
                else:
                    scratch = pool.get(self.dbuf[i].shape, step[info.name], step[i])
                    parts = self.fan_in_sums.setdefault(i, [self.dbuf[i]] if i in direct else [])
                    parts.append(scratch)
                    targets.append(scratch)
                planned.add(i)
            self.dx_targets[info.name] = targets
        self._plan_norm_sums(users)
        for info in self.infos:  # a conv applying a ReLU's mask writes its gradient last
            if info.node.type == "conv2d" and info.layer.relu_dx:
                (i,) = info.node.inputs
                assert self.dx_targets[info.name][0] is self.dbuf[i], info.name
                assert users[i][0] == info.name and i not in self.fan_in_sums, info.name

    def _plan_norm_sums(self, users):
        """A norm whose output only one conv reads, and whose gradient that conv writes
        (neither adding to it nor summed with others), gets its backward sums from the
        conv, which takes them as it writes dx (see conv2d_backward's dx_sums): the norm's
        backward then reads neither its output gradient nor its input. Not for a norm an
        add applies (ResNet-20's bn2), measured at b128, 1 thread (AMD EPYC Zen 5): taken
        in the add's backward pass, or in the epilogue of the conv that writes the
        gradient the add passes through (next block's conv1), they cost as much as the
        norm's own pass saved (~4 ms a step): the norm's input comes from memory there."""
        for norm, readers in self.norm_applied.items():
            bn, read = self._by_name[norm].layer, self.relu_of.get(norm, norm)
            conv = self._by_name[readers[0]]
            direct = (
                conv.node.type == "conv2d"
                and users.get(read) == [conv.name]
                and not conv.layer.accumulate_dx
                and self.dx_targets[conv.name][0] is self.dbuf[read]
                and read not in self.fan_in_sums
            )
            bn.sums_in_reader = direct
            bn.dx_sums = np.zeros((2, bn.in_shapes[0][0])) if direct else None
            conv.layer.dx_sums = (bn.batch_mean, bn.dx_sums) if direct else None

    def _pass_through_adds(self, users, needs_grad, step, read, shared, in_place):
        """An add whose inputs' gradients can all be its own output gradient's buffer
        (each written first by the add, and no input's later writers adding to it before
        another input's gradient is read) passes that buffer through: its backward writes
        nothing. Its fused ReLU's mask then goes to the conv that writes its output
        gradient last, reading the ReLU's output (Conv2d.relu_dx); an add whose mask no
        such conv can apply (ResNet's last, before the pool) keeps its pass. Adds to
        `shared` (gradient -> the buffer it shares) and sets the layers' flags."""
        for info in self.infos:
            if info.node.type == "conv2d":
                info.layer.relu_dx = False
            elif info.node.type == "add":
                info.layer.dout_masked = False
        if not in_place:
            return
        root = partial(_root, shared)
        for info in self.infos:
            name, ins = info.name, info.node.inputs
            if info.node.type != "add" or not needs_grad[name] or len(set(ins)) < len(ins):
                continue
            relu = self.relu_of.get(name)
            out = relu or name
            conv = None
            if relu is not None:  # the conv that writes the ReLU's gradient last
                readers = users.get(out, [])
                first = self._by_name[readers[0]] if readers else None
                if (
                    first is None
                    or len(readers) > 2
                    or first.node.type != "conv2d"
                    or first.layer.is_dense
                    or first.node.inputs != [out]
                    or (len(readers) == 2 and self._by_name[readers[1]].node.inputs.count(out) != 1)
                ):
                    continue
                conv = first.layer
            grads = [i for i in ins if needs_grad[i] and i != INPUT]
            if any(users[i][-1] != name for i in grads):  # the add writes each first
                continue
            later = {i: min((step[u] for u in users[i] if u != name), default=math.inf)
                     for i in grads}  # fmt: skip
            got = {j: read[self.fused.get(j, j)] for j in grads}  # last reads of the gradients
            if any(got[j] >= later[i] for i in grads for j in grads if j != i):
                continue
            for i in grads:
                buf = root(self.fused.get(i, i))
                if buf != root(name):
                    shared[buf] = root(name)
            info.layer.dout_masked = True
            if conv is not None:
                conv.relu_dx = True

    def _shared_add_gradients(self, users, needs_grad, step, read) -> dict:
        """An add gives each input the same gradient: an input that only the add reads
        takes the buffer the add writes for another input (gradient -> owner), so the
        add writes it once. Only where every read of it comes before anything adds to
        the owner's buffer (a second reader of the owner, running backward later)."""
        shared = {}
        for info in self.infos:
            ins = info.node.inputs
            if info.node.type != "add" or len(set(ins)) < len(ins):
                continue
            ok = [i for i in ins if needs_grad[i] and i != INPUT]
            sole = [i for i in ok if users[i] == [info.name] and i not in self.fused]
            owners = [i for i in ok if users[i][-1] == info.name and i not in sole] or sole[:1]
            if not owners:
                continue
            owner = owners[0]
            later = min((step[u] for u in users[owner] if u != info.name), default=math.inf)
            for i in sole:
                if i != owner and read[i] < later:
                    shared[i] = self.fused.get(owner, owner)  # a fused ReLU's is its producer's
        return shared

    def _init_params(self, rng):
        # entries a connection table leaves out are not parameters: they stay zero
        self.masks = {
            f"{i.name}.weight": np.broadcast_to(
                i.layer.connection_mask, self.params[f"{i.name}.weight"].shape
            )
            for i in self.infos
            if getattr(i.layer, "connection_mask", None) is not None
        }
        self._users = {}
        for i in self.infos:
            for src in i.node.inputs:
                self._users.setdefault(src, []).append(i)
        for key, (info, d) in self.defs.items():
            if d.init == "zeros":
                value = np.zeros(d.shape)
            elif d.init == "ones":
                value = np.ones(d.shape)
            elif d.init.startswith("const:"):
                value = np.full(d.shape, float(d.init.split(":", 1)[1]))
            elif d.init == "sign":
                value = np.where(rng.random(d.shape) < 0.5, -1.0, 1.0)
            else:
                value = self._auto_init(info, d, rng)
            if key in self.masks:
                value = value * self.masks[key]
            self.backend.to_device(value, self.params[key])

    def _auto_init(self, info, d, rng):
        """He for the ReLU family, Glorot for tanh/sigmoid, LeCun for scaled tanh and
        for the layer before an output."""
        family = self._next_activation(info)
        if family == "relu":
            return rng.normal(0.0, np.sqrt(2.0 / d.fan_in), d.shape)
        if family == "tanh":
            limit = np.sqrt(6.0 / (d.fan_in + d.fan_out))
            return rng.uniform(-limit, limit, d.shape)
        return rng.normal(0.0, np.sqrt(1.0 / d.fan_in), d.shape)

    def _next_activation(self, info):
        users = self._users
        frontier = users.get(info.name, [])
        for _ in range(8):
            if not frontier:
                return "linear"
            nxt = frontier[0]
            if nxt.layer.family:
                return nxt.layer.family
            if not nxt.layer.transparent_to_init:
                return "linear"
            frontier = users.get(nxt.name, [])
        return "linear"

    # ---- execution ---------------------------------------------------------
    def stage(self, x) -> StagedBatch:
        """Hand over an input batch ahead of the step that uses it: pass the result to
        `forward`, `loss_and_grads` or `step` in place of the array. The batch is copied
        at once (`x` may be reused); on a GPU it then travels to the device on a second
        stream while the current step computes. Two batches can be staged at a time: a
        staged batch must be used before the second `stage` after it."""
        x = np.asarray(x)
        self._check_input(x)
        if self._stager is None:
            self._stager = self.backend.stager(self._input.shape, self.dtype)
        return self._stager.put(x)

    def _check_input(self, x):
        if x.shape != self._input.shape:
            raise ValueError(
                f"input batch has shape {x.shape}, the model expects "
                f"{self._input.shape} (batch size is fixed at compile time)"
            )

    def _load_input(self, x):
        if isinstance(x, StagedBatch):
            if x.stager is not self._stager:
                raise ValueError("this batch was staged for another model")
            self.buf[INPUT] = self._stager.take(x)
            return
        x = np.asarray(x)
        self._check_input(x)
        self.buf[INPUT] = self._input
        self.backend.to_device(x, self._input)

    def _forward(self, train: bool, skip=frozenset()):
        buf, rng = self.buf, self.rng
        folded = {} if train else self.folded  # a folded norm's conv writes its output
        # a conv that runs the residual add after it (eval) writes the add's output
        residuals = {} if train else self.eval_residuals
        # fused layers; a folded norm and a fused add in eval; `skip`: layers the pass
        # needs no output of
        skipped = self.fused.keys() | skip
        if not train:
            skipped = skipped | self.norm_stats.keys() | self.eval_adds.keys()
        for info in self.infos:
            if info.name in skipped:
                continue
            xs = [buf[i] for i in info.node.inputs]
            target = folded.get(info.name, info.name)
            if info.name in residuals:
                target, other = residuals[info.name]
                xs.append(buf[other])
            info.layer.forward(xs, buf[target], self.layer_params[info.name], train, rng)

    def forward(self, x, train: bool = False, outputs=None):
        """Scores of the main output, higher = more likely: the logits of a softmax
        (its probabilities are `model.probabilities`), regression values, or negated
        RBF distances; a host copy. With `outputs` (layer names), a dict of host copies
        by name: output layers give their scores (`model.head_names` names them all),
        other layers their output, if the model was compiled with `keep=[...]` them."""
        infos = [self._readable(name) for name in outputs] if outputs is not None else None
        self._load_input(x)
        with computing():
            self._forward(train)
        to_host = self.backend.to_host
        if infos is None:
            return to_host(self._scores())
        return {info.name: to_host(self._scores(info)) for info in infos}

    @property
    def head_names(self) -> list[str]:
        return [info.name for info in self.outputs]

    def _info(self, name):
        info = self._by_name.get(name)
        if info is None:
            hint = did_you_mean(name, self._by_name) or "the summary lists the layers"
            raise ValueError(f"the model has no layer '{name}'; {hint}")
        return info

    def _readable(self, name):
        info = self._info(name)
        if info.layer.role != "output" and name not in self.keep:
            raise ValueError(
                f"'{name}' is not an output layer: compile with keep=['{name}'] to read it "
                "(its memory is otherwise reused, or a ReLU runs in place in it)"
            )
        return info

    def _scores(self, info=None):
        info = info or self.head
        if info.layer.role != "output":
            return self.buf[info.name]
        return info.layer.scores([self.buf[i] for i in info.node.inputs], self.buf[info.name])

    def probabilities(self, x) -> np.ndarray:
        """Class probabilities of the main output (softmax of the scores)."""
        z = self.forward(x, train=False)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def loss_and_grads(self, x, y, copy: bool = False):
        """Forward in training mode, every output's loss (weighted), backward.

        y: the target of every head, or a dict of targets by head name (needed when the
        heads' losses differ, e.g. a softmax and a linear head). Returns the loss and
        the gradients by parameter name: VIEWS of the model's own gradient buffers,
        overwritten by the next call (what an optimizer updating in place wants);
        copy=True returns host copies instead."""
        if not self.training:
            raise RuntimeError("this model was compiled for inference (training=False)")
        targets = self._targets(y)
        self._load_input(x)
        with computing():
            self._forward(True, skip=self._loss_writes)
            loss = 0.0
            for info in self.outputs:
                xs = [self.buf[i] for i in info.node.inputs]
                loss += info.layer.loss(xs, self.buf[info.name], targets[info.name])
            self.last_scores = self.backend.to_host(self._scores())  # for the metrics
            self._backward()
        if copy:
            return loss, {k: self.backend.to_host(v) for k, v in self.grads.items()}
        return loss, self.grads

    def _targets(self, y) -> dict:
        names = self.head_names
        if isinstance(y, dict):
            unknown = [k for k in y if k not in names]
            missing = [k for k in names if k not in y]
            if unknown or missing:
                raise ValueError(
                    f"targets are by head name: the heads are {names}"
                    + (f"; unknown: {unknown}" if unknown else "")
                    + (f"; missing: {missing}" if missing else "")
                )
            return y
        losses = {info.layer.loss_name for info in self.outputs}
        if len(losses) > 1:
            raise ValueError(
                f"the heads {names} have different losses ({', '.join(sorted(losses))}): "
                "give a target per head, {head name: target}"
            )
        return dict.fromkeys(names, y)

    def input_gradient(self, x, y) -> np.ndarray:
        """d(loss)/d(input) of a batch (saliency, adversarial examples), a host copy.
        The first call plans one more gradient buffer; afterwards every backward pass
        computes it (parameter gradients are computed as usual)."""
        if not self._input_grad and self.training:
            self._input_grad = True
            self._plan_backward(self.batch_size)
        self.loss_and_grads(x, y)
        return self.backend.to_host(self.dbuf[INPUT])

    def _backward(self):
        buf, dbuf = self.buf, self.dbuf
        add = self.backend.kernels("merge").add_forward
        for info in reversed(self.infos):
            name = info.name
            if not self.needs_grad[name]:
                continue
            parts = self.fan_in_sums.get(name)
            if parts:  # several users: their gradients add up (a fused ReLU's too)
                add(parts, dbuf[name])  # one parallel pass; numpy's is serial
            if name in self.fused:
                continue  # its producer applies the ReLU's gradient
            info.layer.backward(
                [buf[i] for i in info.node.inputs],
                buf[name],
                dbuf[name],
                self.dx_targets[name],
                self.layer_params[name],
                self.layer_grads[name],
            )
        parts = self.fan_in_sums.get(INPUT)
        if parts:  # the input feeds several layers (input_gradient)
            add(parts, dbuf[INPUT])

    def step(
        self,
        x,
        y,
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> float:
        """One SGD step on a batch; returns its loss. The momentum state is kept across
        calls, also when momentum, weight_decay or nesterov change between them."""
        if self._sgd is None:
            self._sgd = self.backend.optimizer(
                self, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
            )
        else:
            self._sgd.configure(momentum, nesterov, weight_decay)
        loss, grads = self.loss_and_grads(x, y)
        self._sgd.step(grads, lr=lr)
        return loss

    def predict_classes(self, x) -> np.ndarray:
        return np.argmax(self.forward(x, train=False), axis=1)

    def export_onnx(self, path, aux: bool = True) -> None:
        """This model with its current weights as an ONNX file (needs `cnnspec[onnx]`);
        aux=False leaves auxiliary heads out."""
        from .interop.onnx import export_onnx

        export_onnx(self, path, aux)


def compile_network(
    net,
    device: str = "cpu",
    batch_size: int = 32,
    seed: int = 0,
    dtype=np.float32,
    training: bool = True,
    keep=(),
) -> Model:
    from .memory import check_fits

    # Before any allocation: a model that cannot fit is refused with what would fit (in the
    # host's memory; a device's is not measured here).
    if (device if isinstance(device, str) else device.name) == "cpu":
        check_fits(net, batch_size, training=training, dtype=dtype, device=device)
    return Model(
        net,
        batch_size=batch_size,
        seed=seed,
        dtype=dtype,
        training=training,
        device=device,
        keep=keep,
    )
