"""Diagnostics of the essay's concepts, measured while a trial trains, and a backprop check.

:class:`DiagnosticsCallback` looks at a fixed probe batch once per epoch and records:

- ``grad_norm/<layer>``: the L2 norm of the loss gradient for the kernel of each layer that has
  one (Dense, Conv1D/2D/3D, ...; nested models are opened). ``<layer>`` is the layer's name,
  prefixed by the names of the nested models around it only where two layers share a name
  (``block_1/dense``). The gradient is that of the *data* loss only: a regularization penalty
  adds a term local to each layer that never vanishes, and would hide the vanishing that the
  chain rule produces.
- ``grad_ratio_first_last``: the first kernel layer's gradient norm over the last one's (in the
  model's layer order, input to output). Near zero means the gradient vanished on its way back
  through the layers.
- ``dead_relu/<layer>``: for each hidden ReLU-family activation, given as a layer's
  ``activation=`` or as a layer of its own (``ReLU``, ``Activation("relu")``, ``LeakyReLU``, ...),
  the share of units whose output is ``<= 0`` for every probe sample (for ``relu`` that is
  exactly 0: the unit passes no gradient for any of them). A unit is the last axis: a Dense
  layer's feature, a Conv layer's channel (zero at every position). The output layer's
  activation is not hidden: in a chain of layers none after the last kernel layer counts, in
  any other graph none whose output is the model's output.
- ``weight_l1/<layer>`` and ``weight_l2/<layer>``: the kernel's L1 norm and L2 (Frobenius) norm.
- ``gap_loss`` = ``val_loss - loss`` and, for classification, ``gap_accuracy`` =
  ``accuracy - val_accuracy``: positive values mean the model does better on what it trained on.
- ``diagnostics_seconds`` (once, at the last epoch): what the diagnostics cost the trial.

Values are buffered and sent to MLflow in one batch at the end of training (or every
``flush_seconds``), so no epoch waits on the tracking store.

:func:`gradient_check` compares backpropagation with central finite differences in float64, on
any model that can be rebuilt from its config (Sequential or functional, with Conv, pooling,
BatchNormalization, branches, nested models).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from typing import Any

import keras
import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

# Activations whose units can switch off: output <= 0 for every input of the probe batch.
RELU_FAMILY = ("relu", "leaky_relu", "elu", "selu", "gelu", "silu", "swish", "relu6")
# The same activations given as layers of their own.
_RELU_LAYERS = (keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU, keras.layers.PReLU)

# Per-epoch work on the probe batch is a few dozen small ops. Run eagerly it costs a few ms an
# epoch and nothing up front. A tf.function runs it 3-5x faster but its trace costs 100-300 ms,
# more than a short trial can afford (5% of a 3-epoch quickstart trial is ~100 ms). So trials
# planned for at least this many epochs compile it (at the second epoch) and short ones stay
# eager. The trace is shared by every later model of the same architecture (see _COMPILED).
COMPILE_MIN_EPOCHS = 30
# The share of the training time the probe computations may take. An epoch is measured while
# the time spent on them stays within it (the first and the last epoch always), so short trials
# and ordinary epochs are measured every epoch, and long runs of very short epochs every few.
# The first computation and a one-off trace are not counted against it; diagnostics_seconds
# reports everything.
BUDGET = 0.04
# The probe is about 1/16 of an epoch's samples (its forward and backward pass then cost a few
# percent of the epoch's), at least 64 for stable norms and dead-unit counts, at most 256.
PROBE_SIZE = 256
MIN_PROBE_SIZE = 64
PROBE_SHARE = 1 / 16


class DiagnosticsCallback(keras.callbacks.Callback):
    """Per-epoch diagnostics on a fixed probe batch, logged to an MLflow run with ``step=epoch``.

    The callback holds only plain data (arrays, strings, numbers) until training starts, so it
    survives the ``copy.deepcopy`` KerasTuner applies to callbacks. The values are also kept in
    :attr:`history` (per metric, epoch → value) for use without MLflow.

    The probe computation runs every epoch while the time spent on it stays within
    :data:`BUDGET` of the training time, and always on the first and the last epoch; only long
    runs of very short epochs skip some. The gaps are recorded every epoch.

    Args:
        x: The probe inputs, e.g. a fixed sample of the training split (see :meth:`from_dataset`).
        y: The probe targets.
        uri: The MLflow tracking URI. Defaults to None: nothing is logged to MLflow.
        run_id: The run to log into. Defaults to None.
        flush_seconds: Buffered values are sent to MLflow at most this often, and at the end of
            training, so a fast epoch never waits on the tracking store. Defaults to 10.
        compile_from: Trials planned for at least this many epochs compile the probe
            computation into a ``tf.function``. Defaults to :data:`COMPILE_MIN_EPOCHS`.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        uri: str | None = None,
        run_id: str | None = None,
        flush_seconds: float = 10.0,
        compile_from: int = COMPILE_MIN_EPOCHS,
    ) -> None:
        super().__init__()
        self.x = np.asarray(x)
        self.y = np.asarray(y)
        self.uri = uri
        self.run_id = run_id
        self.flush_seconds = flush_seconds
        self.compile_from = compile_from
        self.history: dict[str, dict[int, float]] = {}
        self.seconds = 0.0  # time spent in diagnostics this training run (diagnostics_seconds)
        self._pending: list[tuple[int, dict[str, float]]] = []
        self._last_flush = 0.0
        self._epoch = 0
        self._probe: _Probe | None = None
        self._deferred = False  # the probe waits for the model to be built

    @classmethod
    def from_dataset(
        cls, dataset: Any, uri: str | None = None, run_id: str | None = None, size: int | None = None, seed: int = 0
    ) -> DiagnosticsCallback:
        """A callback whose probe batch is a fixed, seeded sample of a dataset's training split.

        Args:
            dataset: A :class:`toolkit.data.Dataset`.
            uri: The MLflow tracking URI. Defaults to None.
            run_id: The trial's run. Defaults to None.
            size: Probe samples. Defaults to 1/16 of the training split, within [64, 256].
            seed: Seeds the choice of samples, so every trial sees the same probe. Defaults to 0.

        Returns:
            The callback.
        """
        n = len(dataset.x_train)
        if size is None:
            size = int(min(PROBE_SIZE, max(MIN_PROBE_SIZE, n * PROBE_SHARE)))
        # A random sample rather than the first rows: a split may be ordered by class.
        index = np.sort(np.random.default_rng(seed).choice(n, size=min(n, size), replace=False))
        return cls(dataset.x_train[index], dataset.y_train[index], uri=uri, run_id=run_id)

    # ------------------------------------------------------------------ Keras hooks

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        started = time.perf_counter()
        self.history = {}
        self.seconds = 0.0
        self._epoch = 0
        self._pending = []
        self._last_flush = time.monotonic()
        self._planned = int((self.params or {}).get("epochs") or 0)
        self._train_started = started
        self._spent = 0.0  # probe time counted against the budget
        self._cost: float | None = None  # what the next probe computation is expected to cost
        self._probe = None
        # A subclassed model builds its layers in the first training step: its probe waits for
        # the end of the first epoch.
        self._deferred = not getattr(self.model, "built", True)
        if not self._deferred:
            self._start_probe()
        self.seconds += time.perf_counter() - started

    def _start_probe(self) -> None:
        self._deferred = False
        try:
            self._probe = _Probe(self.model, self.x, self.y)
        except Exception as exc:  # diagnostics must never fail a trial
            log.warning("diagnostics are off for this model: %s", exc)
            self._probe = None

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        started = time.perf_counter()
        self._epoch = epoch
        values = gap_metrics(logs or {})
        training = started - self._train_started - self.seconds  # the trial's own time so far
        last = self._planned and epoch == self._planned - 1
        affordable = self._spent + (self._cost or 0.0) <= BUDGET * training
        if self._deferred:
            self._start_probe()
        if self._probe is not None and (epoch == 0 or last or affordable):
            values.update(self._measure(epoch))
        for key, value in values.items():
            self.history.setdefault(key, {})[epoch] = value
        self._pending.append((epoch, values))
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self._flush()
        self.seconds += time.perf_counter() - started

    def _measure(self, epoch: int) -> dict[str, float]:
        """One probe computation, compiled first when the trial is long enough to repay it."""
        started = time.perf_counter()
        tracing = epoch >= 1 and self._planned >= self.compile_from and not self._probe.compiled
        if tracing:
            self._probe.compile()
        try:
            values = self._probe.measure()
        except Exception as exc:
            log.warning("diagnostics failed at epoch %d and are off for this trial: %s", epoch, exc)
            self._probe = None
            return {}
        cost = time.perf_counter() - started
        # The first call (TensorFlow's one-off set-up) and a trace are paid once per trial, are
        # no guide to what the next calls cost, and are not counted against the budget.
        if not tracing and epoch > 0:
            self._spent += cost
            self._cost = cost if self._cost is None else 0.5 * self._cost + 0.5 * cost
        return values

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        started = time.perf_counter()
        # Drop the references to the model's layers: the callback then holds plain data again.
        self._probe = None
        # What the diagnostics cost this trial, so their overhead can be read from MLflow.
        self.seconds += time.perf_counter() - started
        self._pending.append((self._epoch, {"diagnostics_seconds": self.seconds}))
        self._flush()

    # ------------------------------------------------------------------ logging

    def _flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._pending or not (self.uri and self.run_id):
            self._pending = []
            return
        from mlflow.entities import Metric

        from toolkit import tracking

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for step, values in self._pending for k, v in values.items()]
        self._pending = []
        try:
            # Queued like the per-epoch metrics (see toolkit.tracking): closing the run drains it.
            # MlflowClient.log_batch splits the batch into the store's per-request limits itself.
            tracking.client(self.uri).log_batch(self.run_id, metrics=batch, synchronous=tracking._synchronous())
        except Exception as exc:  # a tracking hiccup must not fail the trial
            log.warning("could not log diagnostics to run %s: %s", self.run_id, exc)


def gap_metrics(logs: dict[str, Any]) -> dict[str, float]:
    """The train/validation gaps from one epoch's Keras logs.

    Args:
        logs: Keras' epoch logs.

    Returns:
        ``gap_loss`` (``val_loss - loss``) and ``gap_accuracy`` (``accuracy - val_accuracy``)
        where both sides are present. Positive values mean the model fits the training data
        better than the validation data.
    """
    out = {}
    pairs = {"gap_loss": ("val_loss", "loss"), "gap_accuracy": ("accuracy", "val_accuracy")}
    for name, (a, b) in pairs.items():
        if a in logs and b in logs:
            value = float(logs[a]) - float(logs[b])
            if math.isfinite(value):
                out[name] = value
    return out


# Compiled probe computations, shared by the models of one architecture. A search's trials often
# repeat an architecture (a grid over L1/L2 strengths, say), and the trace is the expensive part:
# with the weights passed in as arguments, a later model of the same shape pays no trace at all.
_COMPILED: OrderedDict[tuple, Any] = OrderedDict()
_COMPILED_MAX = 32


class _Probe:
    """The per-model part of the diagnostics: the layer plan and the computation on the probe.

    Every layer with a ``kernel`` (Dense, Conv1D/2D/3D, ...) is diagnosed, nested models opened,
    each keyed by its name (qualified by the nested models' names where two layers share one).
    The forward pass takes one of three routes, the cheapest that fits the model:

    - a chain of Dense layers and weightless ones (the MLP): replayed from the weights, which
      are passed in as arguments, so one trace serves every model of the same architecture;
    - any other chain (Conv stacks, BatchNormalization, ...): replayed layer by layer;
    - any other graph (branches, nested models): a functional model over the same layers that
      also returns the hidden ReLU-family outputs. A subclassed model, which has no graph to
      read, is called whole and gets no dead-unit counts.

    Everything runs in inference mode; gradients and norms are computed in float32 (under mixed
    precision the diagnostics stay in full precision).
    """

    def __init__(self, model: keras.Model, x: np.ndarray, y: np.ndarray) -> None:
        self.model = model
        self.x = tf.constant(x)
        self.y = tf.constant(y)
        self.loss_fn = _loss_fn(model)
        if len(getattr(model, "outputs", None) or [None]) != 1:
            raise ValueError("diagnostics need a model with a single output")
        names = _layer_keys(model)
        self.chain = _chain_layers(model)
        self.start = self.x
        if self.chain:
            # The weightless layers before the first kernel (Flatten, a Normalization with fixed
            # statistics) give the same output every epoch: computed once, not per epoch.
            while self.chain and not _has_kernel(self.chain[0]) and not self.chain[0].trainable_weights:
                self.start = self.chain.pop(0)(self.start, training=False)
            self.start = tf.constant(self.start)
            # Dropout is the identity in inference mode; calling it is pure overhead.
            self.chain = [layer for layer in self.chain if not isinstance(layer, keras.layers.Dropout)]
        if self.chain:
            self.kernel_layers = [layer for layer in self.chain if _has_kernel(layer)]
            # The hidden layers: those a kernel layer comes after (the output layer is not one).
            last = max((i for i, layer in enumerate(self.chain) if _has_kernel(layer)), default=-1)
            self.hidden = [layer for layer in self.chain[:last] if _relu_family(layer)]
        else:
            self.kernel_layers = [layer for layer, _ in _walk(model) if _has_kernel(layer)]
        if not self.kernel_layers:
            raise ValueError("the model has no layer with a kernel to diagnose")
        # Weights passed as arguments only fit Dense layers (the replay does their matmul); any
        # other weights (a Conv kernel, BatchNormalization's statistics) are read by the layer.
        self.fast = bool(self.chain) and all(isinstance(layer, keras.layers.Dense) or not layer.weights for layer in self.chain)
        self.signature = None
        if self.fast:
            steps, self.signature = self._plan(model)
            self._python = _chain_computation(steps, self.loss_fn)
        elif self.chain:
            self._python = self._replay_computation
        else:
            self._graph = _HiddenOutputs.of(model)
            self.hidden = self._graph.layers if self._graph is not None else []
            self._python = self._graph_computation
        # The order of the values the computation returns; names are fixed per model.
        kernel_names = [names[id(layer)] for layer in self.kernel_layers]
        self.keys = (
            [f"grad_norm/{n}" for n in kernel_names]
            + [f"weight_l1/{n}" for n in kernel_names]
            + [f"weight_l2/{n}" for n in kernel_names]
            + [f"dead_relu/{names[id(layer)]}" for layer in self.hidden]
        )
        cached = _COMPILED.get(self.signature) if self.signature is not None else None
        self.compiled = cached is not None
        self._fn = cached or self._python

    def _plan(self, model: keras.Model) -> tuple[list[tuple], tuple | None]:
        """The Dense chain as steps for the computation, and a signature that identifies its graph."""
        hidden = {id(layer) for layer in self.hidden}
        steps, signature = [], []
        for layer in self.chain:
            count = id(layer) in hidden
            if isinstance(layer, keras.layers.Dense):
                steps.append(("dense", layer.activation, layer.use_bias, count))
                signature.append(("dense", _activation_name(layer), layer.use_bias, count, tuple(layer.kernel.shape)))
            else:
                steps.append(("layer", layer, count))
                config = {k: v for k, v in layer.get_config().items() if k != "name"}
                signature.append((type(layer).__name__, count, repr(sorted(config.items()))))
        # Only a loss given by name is known to be the same function in another model.
        loss = model.loss if isinstance(model.loss, str) else None
        key = (tuple(signature), loss, tuple(self.start.shape), self.y.dtype.name) if loss else None
        return steps, key

    def compile(self) -> None:
        """Trace the computation (or reuse a trace of the same architecture); later calls run a graph."""
        if self.compiled:
            return
        # No AutoGraph: the loops run over Python lists and unroll at trace time anyway, and
        # converting the source would add to the trace.
        self._fn = tf.function(self._python, autograph=False)
        self.compiled = True
        if self.signature is not None:
            _COMPILED[self.signature] = self._fn
            while len(_COMPILED) > _COMPILED_MAX:
                _COMPILED.popitem(last=False)

    def measure(self) -> dict[str, float]:
        if self.fast:
            # The variables themselves, not their values: a compiled function then reads them in
            # the graph and is reused for any model whose variables have the same shapes.
            kernels = [_variable(layer.kernel) for layer in self.kernel_layers]
            biases = [_variable(layer.bias) for layer in self.kernel_layers if layer.use_bias]
            numbers = self._fn(self.start, self.y, kernels, biases)
        else:
            numbers = self._fn()
        numbers = numbers.numpy().astype("float64")
        values = dict(zip(self.keys, (float(v) for v in numbers), strict=True))
        first, last = numbers[0], numbers[len(self.kernel_layers) - 1]
        if last > 0 and math.isfinite(first):
            values["grad_ratio_first_last"] = float(first / last)
        return values

    # The computations below read the model's variables themselves, so a trace of one of them
    # belongs to this model alone (no signature, no sharing).

    def _replay_computation(self) -> tf.Tensor:
        hidden_ids = {id(layer) for layer in self.hidden}
        kernels = [_variable(layer.kernel) for layer in self.kernel_layers]
        with tf.GradientTape() as tape:
            tape.watch(kernels)  # frozen kernels too: the gradient still flows through them
            h, hidden = self.start, []
            for layer in self.chain:
                h = layer(h, training=False)
                if id(layer) in hidden_ids:
                    hidden.append(h)
            loss = self.loss_fn(self.y, tf.cast(h, tf.float32))
        return _summary(tape.gradient(loss, kernels), kernels, hidden)

    def _graph_computation(self) -> tf.Tensor:
        kernels = [_variable(layer.kernel) for layer in self.kernel_layers]
        with tf.GradientTape() as tape:
            tape.watch(kernels)
            if self._graph is not None:
                outputs, hidden = self._graph([self.x])
                prediction = outputs[0]
            else:
                prediction, hidden = self.model(self.x, training=False), []
            loss = self.loss_fn(self.y, tf.cast(prediction, tf.float32))
        return _summary(tape.gradient(loss, kernels), kernels, hidden)


class _HiddenOutputs:
    """A functional model's forward pass that also returns its hidden ReLU-family outputs.

    It is a ``keras.Model`` over the same layers (so the same variables) whose outputs are the
    model's outputs, the outputs of its hidden ReLU-family layers and the inputs of its nested
    models; each nested model gets its own, fed from those inputs. A layer whose output is an
    output of the whole model is not hidden. A layer called more than once, or a nested model
    whose graph cannot be read, is skipped (with a debug log): its kernels are still diagnosed.
    """

    def __init__(self, model: keras.Model, final: set[int]) -> None:
        hidden, feeds, self.children = [], [], []
        self.layers: list[keras.layers.Layer] = []  # the hidden layers, in the order returned
        for layer in model.layers:
            if isinstance(layer, keras.Model):
                try:
                    (node,) = layer._inbound_nodes  # called once in this graph
                    inner_final = {id(t) for t in layer.outputs} if any(id(t) in final for t in node.output_tensors) else set()
                    child = _HiddenOutputs(layer, inner_final)
                except Exception as exc:
                    log.debug("no dead-unit counts inside nested model %s: %s", layer.name, exc)
                    continue
                if child.layers:
                    feeds.append(list(node.input_tensors))
                    self.children.append(child)
            elif _relu_family(layer):
                nodes = getattr(layer, "_inbound_nodes", None) or []
                if len(nodes) != 1:  # a shared layer: one output per call, none the whole story
                    log.debug("no dead-unit count for layer %s, called %d times", layer.name, len(nodes))
                    continue
                output = layer.output
                if isinstance(output, keras.KerasTensor) and id(output) not in final:
                    hidden.append(output)
                    self.layers.append(layer)
        self.sizes = (len(model.outputs), len(hidden), [len(f) for f in feeds])
        self.fn = keras.Model(list(model.inputs), [*model.outputs, *hidden, *(t for f in feeds for t in f)])
        for child in self.children:
            self.layers.extend(child.layers)

    @classmethod
    def of(cls, model: keras.Model) -> _HiddenOutputs | None:
        """The forward pass of ``model``, or None for a model without a graph (a subclassed one)."""
        try:
            return cls(model, {id(t) for t in model.outputs})
        except Exception as exc:
            log.debug("no dead-unit counts for model %s (no graph to read): %s", model.name, exc)
            return None

    def __call__(self, inputs: list[tf.Tensor]) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
        """The model's outputs and the hidden outputs, in the order of :attr:`layers`."""
        values = self.fn(inputs, training=False)
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        n_out, n_hidden, feed_sizes = self.sizes
        outputs, hidden, rest = values[:n_out], values[n_out : n_out + n_hidden], values[n_out + n_hidden :]
        for child, size in zip(self.children, feed_sizes, strict=True):
            # The nested model runs a second time here, for its hidden outputs only.
            hidden.extend(child(rest[:size])[1])
            rest = rest[size:]
        return outputs, hidden


def _chain_computation(steps: list[tuple], loss_fn: Any) -> Any:
    """The probe computation for a chain of layers, with the weights as arguments.

    Args:
        steps: ``("dense", activation, use_bias, count_dead)`` or ``("layer", layer, count_dead)``
            per layer.
        loss_fn: ``(y_true, y_pred) -> scalar``.

    Returns:
        ``compute(start, y, kernels, biases) -> tensor`` of the gradient norms, weight L1 norms,
        weight L2 norms and dead-unit shares, in that order.
    """

    def compute(start: tf.Tensor, y: tf.Tensor, kernels: list[tf.Tensor], biases: list[tf.Tensor]) -> tf.Tensor:
        with tf.GradientTape() as tape:
            tape.watch(kernels)
            h, hidden, k, b = start, [], 0, 0
            for step in steps:
                if step[0] == "dense":
                    _, activation, use_bias, count_dead = step
                    h = tf.matmul(tf.cast(h, tf.float32), tf.cast(kernels[k], tf.float32))
                    k += 1
                    if use_bias:
                        h = h + tf.cast(biases[b], tf.float32)
                        b += 1
                    h = activation(h)
                    if count_dead:
                        hidden.append(h)
                else:
                    _, layer, count_dead = step
                    h = layer(h, training=False)
                    if count_dead:
                        hidden.append(h)
            loss = loss_fn(y, tf.cast(h, tf.float32))
        return _summary(tape.gradient(loss, kernels), kernels, hidden)

    return compute


def _variable(variable: Any) -> Any:
    """The ``tf.Variable`` behind a Keras variable (float32 under mixed precision too)."""
    value = getattr(variable, "value", variable)
    return value if isinstance(value, tf.Variable) else tf.convert_to_tensor(variable)


def _summary(grads: list[Any], kernels: list[Any], hidden: list[tf.Tensor]) -> tf.Tensor:
    parts = [tf.norm(tf.cast(g, tf.float32)) if g is not None else tf.constant(float("nan")) for g in grads]
    parts += [tf.reduce_sum(tf.abs(tf.cast(k, tf.float32))) for k in kernels]
    parts += [tf.norm(tf.cast(k, tf.float32)) for k in kernels]
    # A unit is a feature of a Dense output and a channel of a Conv one: the last axis.
    parts += [tf.reduce_mean(tf.cast(tf.reduce_all(h <= 0, axis=list(range(len(h.shape) - 1))), tf.float32)) for h in hidden]
    # One tensor, so reading the values back is one device-to-host copy.
    return tf.stack(parts)


def _has_kernel(layer: Any) -> bool:
    """Whether a layer has a built ``kernel`` (Dense, Conv*, EinsumDense, ...)."""
    try:
        return getattr(layer, "kernel", None) is not None and not isinstance(layer, keras.Model)
    except Exception:  # an unbuilt layer may raise instead of returning None
        return False


def _sublayers(layer: Any) -> list[Any]:
    """The layers directly inside a layer: a model's layers, or a custom layer's tracked ones."""
    if isinstance(layer, keras.Model):
        return list(layer.layers)
    return list(getattr(layer, "_layers", None) or [])


def _walk(model: keras.Model, path: tuple[str, ...] = ()) -> list[tuple[Any, tuple[str, ...]]]:
    """Every layer once, with nested models (and custom layers' sublayers) opened, in order.

    Returns:
        ``(layer, path)`` pairs, where ``path`` names the enclosing layers inside ``model``.
    """
    out, seen = [], set()

    def visit(container: Any, path: tuple[str, ...]) -> None:
        for layer in _sublayers(container):
            if id(layer) in seen or isinstance(layer, keras.layers.InputLayer):
                continue
            seen.add(id(layer))
            if not isinstance(layer, keras.Model):
                out.append((layer, path))
            visit(layer, (*path, layer.name))

    visit(model, path)
    return out


def _layer_keys(model: keras.Model) -> dict[int, str]:
    """The metric key of every layer: its name, qualified by its enclosing layers' names only
    where two layers share a name (two instances of one nested block, say)."""
    walked = _walk(model)
    counts: dict[str, int] = {}
    for layer, _ in walked:
        counts[layer.name] = counts.get(layer.name, 0) + 1
    return {id(layer): layer.name if counts[layer.name] == 1 else "/".join((*path, layer.name)) for layer, path in walked}


def _chain_layers(model: keras.Model) -> list[keras.layers.Layer] | None:
    """The model's layers if data flows through them one after another, else None.

    A Sequential model is a chain. A functional model is one when each layer's single input is
    the previous layer's output, which its config records.
    """
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if any(isinstance(layer, keras.Model) for layer in layers):
        return None
    if isinstance(model, keras.Sequential):
        return layers
    try:
        config = model.get_config()
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            return None
    except Exception:  # a subclassed model has no config and no graph to follow
        return None
    previous = None
    order = []
    for entry in config.get("layers", []):
        if entry.get("class_name") == "InputLayer":
            previous = entry["name"]
            continue
        nodes = entry.get("inbound_nodes") or []
        if len(nodes) != 1 or _history_names(nodes[0]) != [previous]:
            return None
        previous = entry["name"]
        order.append(previous)
    return layers if layers and order == [layer.name for layer in layers] else None


def _history_names(node: Any) -> list[str]:
    """The names of the layers whose outputs feed one inbound node of a functional config."""
    found: list[str] = []

    def walk(item: Any) -> None:
        if isinstance(item, dict):
            if item.get("class_name") == "__keras_tensor__":
                found.append(item["config"]["keras_history"][0])
                return
            for value in item.values():
                walk(value)
        elif isinstance(item, (list, tuple)):
            for value in item:
                walk(value)

    walk(node)
    return found


def _activation_name(layer: keras.layers.Layer) -> str:
    fn = getattr(layer, "activation", None)
    return getattr(fn, "__name__", "") if fn is not None else ""


def _relu_family(layer: keras.layers.Layer) -> bool:
    """Whether a layer's output is that of a ReLU-family activation, as ``activation=`` or a layer."""
    if isinstance(layer, keras.Model):
        return False
    return isinstance(layer, _RELU_LAYERS) or _activation_name(layer) in RELU_FAMILY


def _loss_fn(model: keras.Model, dtype: Any = tf.float32) -> Any:
    """The model's compiled loss as ``(y_true, y_pred) -> scalar``, computed in ``dtype``.

    A ``keras.losses.Loss`` casts to its own dtype (float32) in ``__call__``; calling its
    ``call`` keeps the dtype of the inputs, which the float64 gradient check needs.
    """
    identifier = getattr(model, "loss", None)
    if identifier is None:
        raise ValueError("the model is not compiled with a loss; compile it or pass loss=")
    fn = keras.losses.get(identifier)
    if fn is None:
        raise ValueError(f"unsupported loss {identifier!r}: give a single loss name, function or Loss")
    if isinstance(fn, keras.losses.Loss):
        return lambda y_true, y_pred: tf.reduce_mean(tf.cast(fn.call(y_true, y_pred), dtype))
    return lambda y_true, y_pred: tf.reduce_mean(tf.cast(fn(y_true, y_pred), dtype))


# ---------------------------------------------------------------------------- gradient check


def gradient_check(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    loss: Any = None,
    epsilon: float = 1e-6,
    max_checks: int = 200,
    seed: int = 0,
) -> float:
    """Compare backpropagation with central finite differences, in float64.

    The model is rebuilt from its config with every layer in float64 and given the same
    weights, so that rounding does not mask a wrong gradient. For each checked weight ``w``,
    the numerical derivative is ``(L(w + eps) - L(w - eps)) / (2 eps)``; backprop is correct
    when the two agree to about ``1e-7`` relative error. Both include the model's regularization
    penalties. Dropout and other training-only layers run in inference mode.

    Args:
        model: A functional or Sequential Keras model whose layers have ``get_config``.
        x: Inputs, a small batch (a few dozen samples is plenty).
        y: Targets.
        loss: A loss name, function or ``keras.losses.Loss``. Defaults to the model's compiled loss.
        epsilon: The finite-difference step. Defaults to 1e-6.
        max_checks: At most this many weights are checked, chosen at random with every variable
            represented. Defaults to 200.
        seed: Seeds the choice of weights. Defaults to 0.

    Returns:
        The largest relative error over the model's variables, each measured on its checked
        entries as ``||g_bp - g_fd|| / (||g_bp|| + ||g_fd||)``: a norm-based error, because one
        near-zero entry would make an entry-wise ratio meaningless. A correct gradient gives
        about 1e-8 or less; a wrong one gives 1e-2 or more.

    Raises:
        ValueError: When the model has no loss or cannot be rebuilt in float64.
    """
    clone = _float64_clone(model)
    loss_model = model if loss is None else _LossHolder(loss)
    loss_fn = _loss_fn(loss_model, dtype=tf.float64)
    x64 = tf.constant(np.asarray(x, dtype="float64"))
    y_arr = np.asarray(y)
    y64 = tf.constant(y_arr if y_arr.dtype.kind in "iu" else y_arr.astype("float64"))
    variables = clone.trainable_variables

    # Traced once: the finite differences then cost one graph call per evaluation.
    @tf.function
    def total_loss() -> tf.Tensor:
        value = loss_fn(y64, clone(x64, training=False))
        penalties = [tf.cast(p, tf.float64) for p in clone.losses]
        return value + tf.add_n(penalties) if penalties else value

    with tf.GradientTape() as tape:
        value = total_loss()
    grads = tape.gradient(value, variables)

    rng = np.random.default_rng(seed)
    per_var = max(1, max_checks // max(1, len(variables)))
    worst = 0.0
    for var, grad in zip(variables, grads, strict=True):
        analytic = np.zeros(var.shape) if grad is None else np.asarray(grad, dtype="float64")
        flat = np.array(var.numpy(), dtype="float64").reshape(-1)
        picks = rng.choice(flat.size, size=min(flat.size, per_var), replace=False)
        numeric = np.empty(len(picks))
        for j, i in enumerate(picks):
            original = flat[i]
            sides = []
            for sign in (1.0, -1.0):
                flat[i] = original + sign * epsilon
                var.assign(flat.reshape(var.shape))
                sides.append(float(total_loss()))
            flat[i] = original
            numeric[j] = (sides[0] - sides[1]) / (2 * epsilon)
        var.assign(flat.reshape(var.shape))
        backprop = analytic.reshape(-1)[picks]
        scale = np.linalg.norm(backprop) + np.linalg.norm(numeric)
        if scale > 1e-12:
            worst = max(worst, float(np.linalg.norm(backprop - numeric) / scale))
    return worst


class _LossHolder:
    """Lets an explicit ``loss=`` go through the same path as a compiled one."""

    def __init__(self, loss: Any) -> None:
        self.loss = loss


def _float64_clone(model: keras.Model) -> keras.Model:
    """The same model, every layer in float64, with the original's weights."""
    try:
        config = model.get_config()
    except Exception as exc:
        raise ValueError(f"gradient_check needs a model that can be rebuilt from its config: {exc}") from None
    config = _to_float64(config)
    try:
        clone = model.__class__.from_config(config)
    except Exception as exc:
        raise ValueError(f"gradient_check could not rebuild the model in float64: {exc}") from None
    clone.set_weights([np.asarray(w, dtype="float64") if np.asarray(w).dtype.kind == "f" else w for w in model.get_weights()])
    return clone


def _to_float64(config: Any) -> Any:
    """Replace every floating dtype (plain or a dtype policy) in a Keras config with float64."""
    floating = {"float16", "bfloat16", "float32", "float64", "mixed_float16", "mixed_bfloat16"}
    if isinstance(config, dict):
        out = {}
        for key, value in config.items():
            if key == "dtype" and isinstance(value, str) and value in floating:
                out[key] = "float64"
            elif key == "dtype" and isinstance(value, dict) and value.get("class_name") in ("DTypePolicy", "FloatDTypePolicy"):
                out[key] = "float64"
            else:
                out[key] = _to_float64(value)
        return out
    if isinstance(config, list):
        return [_to_float64(v) for v in config]
    if isinstance(config, tuple):
        return tuple(_to_float64(v) for v in config)
    return config
