"""P1's baseline: the search a KerasTuner user writes by hand, with no tracking.

Same data (digits, the same stratified 80/20 split with seed 42, standardized with training
statistics), the same space (the same hyperparameter names, declared in the same order, so
RandomSearch with the same seed samples the same trials), the same epochs and batch size.
KerasTuner's random search advances its seed once for every declared hyperparameter, fixed
ones included, and the toolkit declares l1, l2 and dropout even when the card fixes them (and
momentum for SGD with momentum): the script declares them too, as ``hp.Fixed``, or its trials
would be other trials. It prints every trial's values so that a run can be checked against
the toolkit's.

    python benchmarks/bare_kerastuner.py --trials 4 --epochs 10 --batch-size 64

``--space p9`` is P9's smaller space (benchmarks/cards/p9.yaml): depth 1-3, units 16/32/64,
relu/tanh/sigmoid, adam/sgd, a log learning rate.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_tuner as kt  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--space", choices=["quickstart", "p9"], default="quickstart")
    args = parser.parse_args()

    x, y = load_digits(return_X_y=True)
    x = x.astype("float32")
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.2, random_state=42, stratify=y)
    mean, var = x_train.mean(0), x_train.var(0)

    def build_p9(hp: kt.HyperParameters) -> keras.Model:
        depth = hp.Int("depth", 1, 3)
        units = hp.Choice("units", [16, 32, 64])
        activation = hp.Choice("activation", ["relu", "tanh", "sigmoid"])
        hp.Fixed("l1", 0.0)
        hp.Fixed("l2", 0.0)
        hp.Fixed("dropout", 0.0)
        name = hp.Choice("optimizer", ["adam", "sgd"])
        lr = hp.Float("learning_rate", 1e-4, 1e-1, sampling="log")
        inputs = keras.Input((64,))
        h = keras.layers.Normalization(mean=mean, variance=var + 1e-12)(inputs)
        for _ in range(depth):
            h = keras.layers.Dense(units, activation=activation)(h)
        model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(h))
        optimizer = keras.optimizers.Adam(lr) if name == "adam" else keras.optimizers.SGD(lr)
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    def build(hp: kt.HyperParameters) -> keras.Model:
        depth = hp.Int("depth", 1, 4)
        units = hp.Choice("units", [32, 64, 128])
        activation = hp.Choice("activation", ["sigmoid", "tanh", "relu"])
        l1 = hp.Choice("l1", [0.0, 1e-5, 1e-4])
        l2 = hp.Float("l2", 1e-6, 1e-2, sampling="log")
        hp.Fixed("dropout", 0.0)
        name = hp.Choice("optimizer", ["sgd", "momentum", "adam", "rmsprop"])
        lr = hp.Float("learning_rate", 1e-4, 1e-1, sampling="log")
        with hp.conditional_scope("optimizer", ["momentum"]):
            momentum = hp.Fixed("momentum", 0.9) if name == "momentum" else 0.0
        inputs = keras.Input((64,))
        h = keras.layers.Normalization(mean=mean, variance=var + 1e-12)(inputs)
        for _ in range(depth):
            h = keras.layers.Dense(units, activation=activation, kernel_regularizer=keras.regularizers.L1L2(l1, l2))(h)
        model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(h))
        optimizer = {
            "sgd": lambda: keras.optimizers.SGD(lr),
            "momentum": lambda: keras.optimizers.SGD(lr, momentum=momentum),
            "adam": lambda: keras.optimizers.Adam(lr),
            "rmsprop": lambda: keras.optimizers.RMSprop(lr),
        }[name]()
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    with tempfile.TemporaryDirectory() as folder:
        tuner = kt.RandomSearch(
            build_p9 if args.space == "p9" else build,
            objective="val_accuracy",
            max_trials=args.trials,
            seed=42,
            directory=folder,
            project_name="bare",
        )
        tuner.search(x_train, y_train, validation_data=(x_val, y_val), epochs=args.epochs, batch_size=args.batch_size, verbose=0)
        for trial in tuner.oracle.trials.values():
            print(f"trial {trial.trial_id}: {trial.hyperparameters.values}")
        best = tuner.oracle.get_best_trials(1)[0]
        print(f"best val_accuracy={best.score:.4f} with {best.hyperparameters.values}")


if __name__ == "__main__":
    main()
