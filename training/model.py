"""The Keras classifier: grey (size, size, 1) input in [0, 1] → a softmax over
``minipacs.reasons.CLASSES`` ("p_class": valid, then why an image is not), so that a flag says
why. P(valid) is its first entry; :func:`with_p_valid` adds it as the output the plugin reads.

The reason head replaced a single sigmoid P(valid) at the same size and cost: the last layer
grows from 65 to 650 weights.

``minipacs`` (the default) was chosen by measurement against the predecessor's network (two
conv blocks, Flatten, Dense 64 at 152×152; ``predecessor`` here): a strided first convolution
and three poolings bring 128×128 down to 8×8 before the dense layer, so it has 18× fewer weights
(295k, a 1.2 MB ONNX file instead of 20 MB) and trains 4.9× faster per epoch on the 2-core
machine (22 s against 106 s on the default dataset) with the same accuracy after one epoch
(validation 0.88 against 0.90), while the 8×8 grid still tells *where* a box or a broken band
is (global pooling would not).
"""

import keras
import numpy as np
from keras import layers
from tqdm.keras import TqdmCallback

from minipacs.reasons import CLASSES
from minipacs.scoring import WINDOW_OUTPUT
from training import pretrained

OUTPUT, CLASS_OUTPUT = "p_valid", "p_class"


def minipacs(size: int) -> keras.Model:
    """At 128 pixels the network above; a larger input (``--size 256``) first halves the image
    with strided 16-filter convolutions down to 128, so small things (a dialog a twentieth of
    the side wide) keep more pixels at a third more compute, not four times as much."""
    inputs = keras.Input(shape=(size, size, 1), name="image")
    x = inputs
    while x.shape[1] > 128:
        x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    x = layers.Dense(64, activation="relu")(x)
    x = layers.Dropout(0.3)(x)
    outputs = layers.Dense(len(CLASSES), activation="softmax", name=CLASS_OUTPUT)(x)
    return keras.Model(inputs, outputs, name="minipacs")


def minipacs_bn(size: int) -> keras.Model:
    """The network above with batch normalisation after every convolution, 64 filters in the
    third block and a 1×1 convolution down to 32 channels before the 8×8 grid is flattened
    (the dense layer then has half the inputs). Normalising each layer's responses makes
    training less sensitive to an image's overall grey level and contrast (MR windows differ
    wildly), at 1.4× the multiply-adds."""
    inputs = keras.Input(shape=(size, size, 1), name="image")
    x = inputs
    while x.shape[1] > 128:
        x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)

    def block(x, filters, strides=1):
        x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)(x)
        return layers.ReLU()(layers.BatchNormalization()(x))

    x = block(x, 16, strides=2)
    x = block(x, 32)
    x = layers.MaxPooling2D()(x)
    x = block(x, 64)
    x = layers.MaxPooling2D()(x)
    x = block(x, 64)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(32, 1, activation="relu")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(64, activation="relu")(x)
    x = layers.Dropout(0.3)(x)
    outputs = layers.Dense(len(CLASSES), activation="softmax", name=CLASS_OUTPUT)(x)
    return keras.Model(inputs, outputs, name="minipacs_bn")


def predecessor(size: int) -> keras.Model:
    """The predecessor's network (it used size 152), kept to compare against."""
    inputs = keras.Input(shape=(size, size, 1), name="image")
    x = layers.Conv2D(32, 3, activation="relu")(inputs)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    x = layers.Dense(64, activation="relu")(x)
    outputs = layers.Dense(len(CLASSES), activation="softmax", name=CLASS_OUTPUT)(x)
    return keras.Model(inputs, outputs, name="predecessor")


ARCHITECTURES = {"minipacs": minipacs, "minipacs-bn": minipacs_bn, "predecessor": predecessor}

# Where the frozen MobileNetV2 is read (its expansion layers, the richest ones): block 6 sees
# the image at stride 8 (edges, stripes, text strokes), block 10 at stride 16 (parts, layout).
# Both are ImageNet weights: nsfwjs fine-tuned block 11 on (training.pretrained).
MOBILENET_TAPS = ("block_6_expand_relu", "block_10_expand_relu")


def mobilenet_features(size: int, weights: dict[str, np.ndarray] | None) -> keras.Model:
    """Image → 1,152 numbers: the mean and the maximum of each channel of MobileNetV2's
    ImageNet features at ``MOBILENET_TAPS``; frozen. Its first layer takes the grey [0, 1]
    input (``pretrained.for_grey``), so ``preprocess.model_input`` stays the one preprocessing.
    ``weights``: ``training.pretrained.weights()`` (None: random, to test the graph without the
    download).

    Features learnt from a million photographs know what photographs, drawings and text look
    like, which a network trained from scratch on a few thousand scans has to guess; the
    from-scratch network's verdict on real scans unlike its training data moved from run to
    run (MODEL_CARD.md)."""
    base = keras.applications.MobileNetV2(input_shape=(size, size, 1), include_top=False, weights=None)
    if weights is not None:
        weights = pretrained.for_grey(weights)
        # TensorFlow.js lists each layer's weights in Keras' order; matched by layer, since the
        # variables' names differ between Keras 2 and 3 (a depthwise kernel is "kernel" in 3).
        by_layer: dict[str, list[np.ndarray]] = {}
        for name, value in weights.items():
            by_layer.setdefault(name.split("/")[0], []).append(value)
        for layer in base.layers:
            if layer.weights:
                layer.set_weights(by_layer[layer.name])
    inputs = keras.Input(shape=(size, size, 1), name="image")
    taps = keras.Model(base.input, [base.get_layer(name).output for name in MOBILENET_TAPS])(inputs)
    pooled = [pool()(t) for t in taps for pool in (layers.GlobalAveragePooling2D, layers.GlobalMaxPooling2D)]
    features = keras.Model(inputs, layers.Concatenate()(pooled), name="features")
    features.trainable = False
    return features


def linear_head(features: np.ndarray) -> keras.Model:
    """Features → softmax over the classes: standardised by the training features' statistics,
    dropout, one dense layer. Linear on purpose: a hidden layer fitted the (mostly synthetic)
    test split better and real knee MR worse (MODEL_CARD.md)."""
    inputs = keras.Input(shape=features.shape[1:], name="features")
    x = layers.Normalization(mean=features.mean(axis=0), variance=features.var(axis=0) + 1e-6)(inputs)
    x = layers.Dropout(0.2)(x)
    outputs = layers.Dense(len(CLASSES), activation="softmax", kernel_regularizer=keras.regularizers.l2(1e-4))(x)
    return keras.Model(inputs, outputs, name="head")


def train_mobilenet(features: keras.Model, train_data, validate_data, heads: int, seed: int,
                    **options) -> tuple[keras.Model, list[dict]]:
    """The frozen features are computed once per image, then ``heads`` linear heads are
    trained on them (seeds ``seed``, ``seed + 1``, ...; :func:`train` with ``options``) and
    their softmaxes averaged: more heads cost next to nothing and steady the verdict on images
    near the boundary. Returns the image → softmax model and the heads' histories."""
    train_x, validate_x = (features.predict(x, batch_size=64, verbose=0) for x in (train_data[0], validate_data[0]))
    members, histories = [], []
    for n in range(heads):
        keras.utils.set_random_seed(seed + n)
        members.append(linear_head(train_x))
        histories.append(train(members[-1], (train_x, train_data[1]), (validate_x, validate_data[1]), **options))
    named = [keras.Model(m.inputs[0], m.outputs[0], name=f"head{n}") for n, m in enumerate(members)]
    return keras.Model(features.inputs[0], read_off(features.inputs[0], features, named),
                       name="mobilenet_linear"), histories


def read_off(image, features: keras.Model, heads: list[keras.Model], window: keras.Model | None = None) -> list:
    """``p_class`` (the heads' softmaxes averaged) and, given the window head
    (``training.windowhead``), ``p_window``, all read off one pass of ``features`` over ``image``."""
    shared = features(image)
    named = [head(shared) for head in heads]
    outputs = [layers.Activation("linear", name=CLASS_OUTPUT)(named[0] if len(named) == 1 else layers.Average()(named))]
    if window is not None:
        outputs.append(layers.Activation("linear", name=WINDOW_OUTPUT)(window(shared)))
    return outputs


def with_window(model: keras.Model, window: keras.Model) -> keras.Model:
    """A model of :func:`train_mobilenet` with the window head beside its heads: image →
    [p_class, p_window]."""
    image = keras.Input(shape=model.input_shape[1:], name="image")
    heads = [layer for layer in model.layers if layer.name.startswith("head")]
    return keras.Model(image, read_off(image, model.get_layer("features"), heads, window), name=model.name)


def ensemble(members: list[keras.Model]) -> keras.Model:
    """One model whose softmax is the mean of the members' (``--ensemble N``: the same network
    trained from N seeds). Averaging steadies the verdict on images near the boundary, where a
    single network's answer moves from run to run, at N times the scoring cost."""
    inputs = keras.Input(shape=members[0].inputs[0].shape[1:], name="image")
    # Nested models need distinct names: each member under a name of its own (Keras 2 and 3).
    renamed = [keras.Model(member.inputs[0], member.outputs[0], name=f"member{n}")
               for n, member in enumerate(members)]
    outputs = layers.Average(name=CLASS_OUTPUT)([member(inputs) for member in renamed])
    return keras.Model(inputs, outputs, name=f"{members[0].name}_ensemble")


def with_p_valid(model: keras.Model) -> keras.Model:
    """The model with ``p_valid`` (N, 1) before its outputs (``p_class`` first): P(valid) is
    picked out of the softmax by a fixed linear layer (no Lambda, so tf2onnx sees plain MatMul)."""
    pick = layers.Dense(1, use_bias=False, trainable=False, name=OUTPUT)
    p_valid = pick(model.outputs[0])
    kernel = np.zeros((len(CLASSES), 1), np.float32)
    kernel[0, 0] = 1.0
    pick.set_weights([kernel])
    return keras.Model(model.input, [p_valid, *model.outputs], name=model.name)


def train(model: keras.Model, train_data, validate_data, epochs: int, batch_size: int,
          patience: int, learning_rate: float) -> dict:
    """Adam + cross-entropy over the classes (labels: class indices); halves the step, then
    stops, when validation loss stops improving, and keeps the best epoch's weights. Returns
    the history (per-epoch loss, accuracy and learning rate)."""
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)
    # Halving the step when validation loss stalls lets the last epochs settle the few hard
    # cases (small boxes, strong zooms) that a constant step keeps jumping over.
    slower = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=max(1, patience // 2))
    history = model.fit(*train_data, validation_data=validate_data, epochs=epochs, batch_size=batch_size,
                        shuffle=True, callbacks=[stop, slower, TqdmCallback(verbose=0)], verbose=0)
    return {k: [float(v) for v in values] for k, values in history.history.items()}
