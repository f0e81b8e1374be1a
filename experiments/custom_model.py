"""A model of your own for `make tune EXP=custom_model`: a two-branch network over digits.

Digits arrive as 8x8x1 images of raw pixel values (0-16), flattened here to 64 values. One branch reads them as a 1-D signal through a
Conv1D; the other is a plain Dense layer over all pixels. KerasTuner's ``hp`` declares this
model's own knobs (`filters`, `kernel_size`, `dense_units`, `pooling`); their names become each
trial's MLflow params. The model is returned uncompiled, so the toolkit compiles it with the
card's optimizer, learning-rate and L1/L2 space.
"""

import keras


def build(hp):
    inputs = keras.Input(shape=(8, 8, 1), name="pixels")
    x = keras.layers.Flatten(name="flatten")(inputs)
    x = keras.layers.Rescaling(1 / 16, name="scale")(x)

    signal = keras.layers.Reshape((64, 1), name="as_signal")(x)
    conv = keras.layers.Conv1D(
        hp.Choice("filters", [8, 16]), hp.Int("kernel_size", 3, 5, step=2), activation="relu", name="conv"
    )(signal)
    if hp.Choice("pooling", ["max", "avg"]) == "max":
        conv = keras.layers.GlobalMaxPooling1D(name="pool")(conv)
    else:
        conv = keras.layers.GlobalAveragePooling1D(name="pool")(conv)

    dense = keras.layers.Dense(hp.Choice("dense_units", [16, 32]), activation="relu", name="dense")(x)

    merged = keras.layers.Concatenate(name="merge")([conv, dense])
    outputs = keras.layers.Dense(10, activation="softmax", name="output")(merged)
    return keras.Model(inputs, outputs, name="two_branch")
