"""Deep-learning representations and elastic-net classifiers on top of them.

Shen et al., "Deep Learning to Improve Breast Cancer Detection on Screening Mammography",
Sci Rep 9, 12495 (2019); arXiv:1708.09427. The 2017 code used these to combine the CC and MLO
views of a breast: both views go through a trained network, hidden-layer features of the two
are concatenated, and a linear classifier with an elastic-net penalty is fitted on them.

- :class:`DLRepr`: features of named or indexed layers of a Keras model, for arrays or batch
  iterators. A 4-D layer output (batch, rows, cols, channels) is global-average-pooled over
  rows and cols to (batch, channels); any other output of rank > 2 is flattened.
- :class:`MultiViewDLElasticNet`: CC features and MLO features concatenated (CC first), then
  optionally standardised (zero mean, unit variance per feature, fitted on the training set),
  then ``SGDClassifier(loss="log_loss", penalty="elasticnet")`` or an elastic-net
  ``LogisticRegression`` (saga). ``save``/``load`` use a ``.npz`` file of plain arrays plus a
  JSON string (read with ``allow_pickle=False``), so loading a classifier never executes code;
  the Keras network is kept in its own HDF5 file.
"""
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from dm_image import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["DLRepr", "MultiViewDLElasticNet", "CLASSIFIER_CHOICES"]

PathLike = Union[str, os.PathLike]
CLASSIFIER_CHOICES = ("sgd", "logistic")
_FORMAT = "dm_enet.MultiViewDLElasticNet/1"


def _load_model(model_or_path, custom_objects=None, safe_mode=True):
    """A Keras model, or one loaded from an HDF5 path with ``dm_keras_ext.robust_load_model``
    (a file whose layers carry code is refused unless ``safe_mode`` is False)."""
    if isinstance(model_or_path, (str, os.PathLike)):
        from dm_keras_ext import robust_load_model

        return robust_load_model(os.fspath(model_or_path), custom_objects=custom_objects,
                                 safe_mode=safe_mode)
    if not hasattr(model_or_path, "layers"):
        raise TypeError(f"model_or_path should be a Keras model or an HDF5 path, got "
                        f"{type(model_or_path).__name__}")
    return model_or_path


def _resolve_layers(model, layer_names, layer_indices) -> List:
    """Top-level layers of ``model`` by name or index (exactly one of the two)."""
    if (layer_names is None) == (layer_indices is None):
        raise ValueError("give exactly one of layer_names and layer_indices, got "
                         f"layer_names={layer_names!r}, layer_indices={layer_indices!r}")
    if layer_names is not None:
        if isinstance(layer_names, str):
            layer_names = [layer_names]
        valid = [lyr.name for lyr in model.layers]
        unknown = [n for n in layer_names if n not in valid]
        if unknown:
            raise ValueError(f"unknown layer name(s) {unknown} in model {model.name!r}; "
                             f"valid names: {valid}")
        return [model.get_layer(n) for n in layer_names]
    if isinstance(layer_indices, (int, np.integer)):
        layer_indices = [layer_indices]
    nb = len(model.layers)
    bad = [i for i in layer_indices if not -nb <= int(i) < nb]
    if bad:
        raise ValueError(f"layer index(es) {bad} out of range for model {model.name!r} with "
                         f"{nb} layers (valid: {-nb}..{nb - 1})")
    return [model.layers[int(i)] for i in layer_indices]


class DLRepr:
    """Hidden-layer features of a Keras model.

    Args:
        model_or_path: a tf-keras model, or an HDF5 file (loaded with
            ``dm_keras_ext.robust_load_model``, so Keras 2.0.8 files work).
        layer_names: top-level layer names whose outputs are the features.
        layer_indices: or their indices in ``model.layers`` (negative counts from the end).
            Names are safer: indices change between Keras versions.
        custom_objects: passed to the loader.
        safe_mode: refuse a model file with Lambda layers (code); False only for trusted files.

    Attributes:
        model: the full model.
        layers: the resolved layers.
        repr_model: a model from the inputs to the (pooled) features, one output per layer.
        feature_dims: number of features per layer.

    Features of a 4-D output are global-average-pooled over the spatial axes (channels-last),
    other outputs of rank > 2 are flattened; the layers' features are concatenated in the
    order given.
    """

    def __init__(self, model_or_path, layer_names: Optional[Sequence[str]] = None,
                 layer_indices: Optional[Sequence[int]] = None, custom_objects=None,
                 safe_mode: bool = True):
        import tf_keras as keras

        self.model = _load_model(model_or_path, custom_objects, safe_mode)
        self.layers = _resolve_layers(self.model, layer_names, layer_indices)
        outputs = []
        for layer in self.layers:
            out = layer.output
            if len(out.shape) == 4:
                out = keras.layers.GlobalAveragePooling2D(name=f"{layer.name}_repr_gap")(out)
            elif len(out.shape) > 2:
                out = keras.layers.Flatten(name=f"{layer.name}_repr_flat")(out)
            outputs.append(out)
        self.repr_model = keras.Model(self.model.inputs, outputs, name="dl_repr")
        self.feature_dims = [int(o.shape[-1]) for o in outputs]

    @property
    def layer_names(self) -> List[str]:
        return [lyr.name for lyr in self.layers]

    def _predict(self, x) -> np.ndarray:
        out = self.repr_model(x, training=False)
        if not isinstance(out, (list, tuple)):
            out = [out]
        return np.concatenate([np.asarray(o, dtype=np.float32) for o in out], axis=1)

    def get_feats(self, data: Any, batch_size: int = 32, steps: Optional[int] = None,
                  return_labels: bool = False
                  ) -> Union[np.ndarray, Tuple[np.ndarray, Optional[np.ndarray]]]:
        """Features of images given as an array or as a batch iterator.

        Args:
            data: float32 array (n, height, width, channels), preprocessed as the model
                expects; or an iterator/generator of batches ``X`` or ``(X, y[, w])``
                (e.g. a ``DMImageDataGenerator`` iterator, a ``keras.utils.Sequence``).
            batch_size: batch size for arrays.
            steps: batches to take from an iterator; default ``len(data)`` for a Sequence, or
                ``ceil(nb_sample / batch_size)`` for an iterator with ``nb_sample`` (its
                ``reset()`` is called first). Required for other generators.
            return_labels: also return the labels collected from ``(X, y)`` batches.

        Returns:
            float32 array (n, sum(feature_dims)); with ``return_labels`` also the stacked
            labels (or None when the batches carried none).
        """
        if isinstance(data, np.ndarray):
            feats = [self._predict(data[i:i + batch_size])
                     for i in range(0, len(data), batch_size)]
            out = np.concatenate(feats) if feats else np.zeros((0, sum(self.feature_dims)),
                                                                np.float32)
            return (out, None) if return_labels else out
        return self._feats_from_iter(data, steps, return_labels)

    def _feats_from_iter(self, data, steps, return_labels):
        nb_sample = getattr(data, "nb_sample", None)
        if steps is None:
            if nb_sample is not None and getattr(data, "batch_size", None):
                steps = math.ceil(nb_sample / data.batch_size)
            elif hasattr(data, "__len__"):
                steps = len(data)
            else:
                raise ValueError("steps is required for a generator without nb_sample/len")
        if hasattr(data, "reset"):
            data.reset()
        is_seq = hasattr(data, "__getitem__") and hasattr(data, "__len__") \
            and not hasattr(data, "__next__")
        it = None if is_seq else iter(data)
        feats, labels = [], []
        for step in range(steps):
            batch = data[step] if is_seq else next(it)
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            feats.append(self._predict(np.asarray(x)))
            if isinstance(batch, (tuple, list)) and len(batch) > 1:
                labels.append(np.asarray(batch[1]))
        out = np.concatenate(feats)
        lab = np.concatenate(labels) if labels else None
        if nb_sample is not None and len(out) > nb_sample:  # an iterator that wrapped around
            out = out[:nb_sample]
            lab = lab[:nb_sample] if lab is not None else None
        return (out, lab) if return_labels else out


def _logistic_kwargs(alpha_c: float, l1_ratio: float, max_iter: int, seed: int) -> Dict:
    import sklearn

    kw = dict(solver="saga", l1_ratio=l1_ratio, C=alpha_c, max_iter=max_iter, random_state=seed)
    major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
    if (major, minor) < (1, 8):  # 'penalty' is deprecated from 1.8 on
        kw["penalty"] = "elasticnet"
    return kw


class MultiViewDLElasticNet:
    """CC + MLO deep features and an elastic-net linear classifier.

    Args:
        dl_model: Keras model or HDF5 path giving the features (see :class:`DLRepr`); may be
            None to work on precomputed features only (``fit_features``/``predict_proba_features``).
        layer_names, layer_indices: feature layers (exactly one of the two with ``dl_model``).
        classifier: ``"sgd"`` (``SGDClassifier(loss="log_loss", penalty="elasticnet")``) or
            ``"logistic"`` (``LogisticRegression`` with saga and ``l1_ratio``).
        alpha: SGD regularisation strength (``alpha``); for ``"logistic"`` the inverse
            strength ``C`` is ``1 / alpha``.
        l1_ratio: elastic-net mixing, 0 = L2 only, 1 = L1 only.
        standardize: standardise features with the training mean and standard deviation.
        max_iter: classifier iterations.
        seed: classifier random state.
        custom_objects: for loading ``dl_model`` from a path.
        safe_mode: refuse a ``dl_model`` file with Lambda layers (code); False only for
            trusted files.
    """

    def __init__(self, dl_model=None, layer_names=None, layer_indices=None,
                 classifier: str = "sgd", alpha: float = 1e-4, l1_ratio: float = 0.15,
                 standardize: bool = True, max_iter: int = 1000, seed: int = 12345,
                 custom_objects=None, safe_mode: bool = True):
        if classifier not in CLASSIFIER_CHOICES:
            raise ValueError(f"classifier should be one of {list(CLASSIFIER_CHOICES)}, "
                             f"got {classifier!r}")
        if not alpha > 0:
            raise ValueError(f"alpha should be > 0, got {alpha}")
        if not 0 <= l1_ratio <= 1:
            raise ValueError(f"l1_ratio should be in [0, 1], got {l1_ratio}")
        self.config = {"classifier": classifier, "alpha": float(alpha),
                       "l1_ratio": float(l1_ratio), "standardize": bool(standardize),
                       "max_iter": int(max_iter), "seed": int(seed),
                       "layer_names": list(layer_names) if layer_names is not None else None,
                       "layer_indices": ([int(i) for i in layer_indices]
                                         if layer_indices is not None else None),
                       "dl_model_path": (os.fspath(dl_model)
                                         if isinstance(dl_model, (str, os.PathLike)) else None)}
        self.repr = (DLRepr(dl_model, layer_names, layer_indices, custom_objects, safe_mode)
                     if dl_model is not None else None)
        self.clf = None
        self.scaler_mean_ = None
        self.scaler_scale_ = None

    def _new_classifier(self):
        from sklearn.linear_model import LogisticRegression, SGDClassifier

        c = self.config
        if c["classifier"] == "sgd":
            return SGDClassifier(loss="log_loss", penalty="elasticnet", alpha=c["alpha"],
                                 l1_ratio=c["l1_ratio"], max_iter=c["max_iter"],
                                 random_state=c["seed"], tol=1e-4)
        return LogisticRegression(**_logistic_kwargs(1.0 / c["alpha"], c["l1_ratio"],
                                                     c["max_iter"], c["seed"]))

    def get_features(self, X_cc: Any, X_mlo: Any, batch_size: int = 32) -> np.ndarray:
        """Concatenated features ``[CC | MLO]``, float32 (n, 2 * sum(feature_dims)).

        Args:
            X_cc, X_mlo: preprocessed CC and MLO images of the same n breasts, arrays
                (n, height, width, channels) or batch iterators (see ``DLRepr.get_feats``).
        """
        if self.repr is None:
            raise ValueError("this MultiViewDLElasticNet has no dl_model; use fit_features / "
                             "predict_proba_features or pass dl_model")
        f_cc = self.repr.get_feats(X_cc, batch_size=batch_size)
        f_mlo = self.repr.get_feats(X_mlo, batch_size=batch_size)
        if len(f_cc) != len(f_mlo):
            raise ValueError(f"CC and MLO inputs should hold the same breasts, got {len(f_cc)} "
                             f"CC and {len(f_mlo)} MLO images")
        return np.concatenate([f_cc, f_mlo], axis=1)

    def _scale(self, feats: np.ndarray) -> np.ndarray:
        if self.scaler_mean_ is None:
            return feats
        return (feats - self.scaler_mean_) / self.scaler_scale_

    def fit_features(self, feats: np.ndarray, y: np.ndarray) -> "MultiViewDLElasticNet":
        """Fit the scaler and classifier on precomputed features (n, d) and labels (n,)."""
        feats = np.asarray(feats, dtype=np.float64)
        y = np.asarray(y)
        if feats.ndim != 2 or len(feats) != len(y):
            raise ValueError(f"features should be (n, d) with n labels, got {feats.shape} and "
                             f"{y.shape}")
        if len(np.unique(y)) < 2:
            raise ValueError("fit needs at least two classes in y")
        if self.config["standardize"]:
            self.scaler_mean_ = feats.mean(axis=0)
            std = feats.std(axis=0)
            self.scaler_scale_ = np.where(std > 0, std, 1.0)
        self.clf = self._new_classifier().fit(self._scale(feats), y)
        logger.info("fitted %s on %d samples x %d features; %d non-zero coefficients",
                    self.config["classifier"], feats.shape[0], feats.shape[1],
                    int(np.count_nonzero(self.clf.coef_)))
        return self

    def fit(self, X_cc: Any, X_mlo: Any, y: np.ndarray, batch_size: int = 32
            ) -> "MultiViewDLElasticNet":
        """Extract CC/MLO features through the network and fit the classifier."""
        return self.fit_features(self.get_features(X_cc, X_mlo, batch_size), y)

    def predict_proba_features(self, feats: np.ndarray) -> np.ndarray:
        """Class probabilities (n, nb_class), columns in ``classes_`` order."""
        if self.clf is None:
            raise ValueError("the classifier is not fitted; call fit or load first")
        feats = np.asarray(feats, dtype=np.float64)
        return self.clf.predict_proba(self._scale(feats))

    def predict_proba(self, X_cc: Any, X_mlo: Any, batch_size: int = 32) -> np.ndarray:
        """Class probabilities (n, nb_class) for CC/MLO image pairs."""
        return self.predict_proba_features(self.get_features(X_cc, X_mlo, batch_size))

    @property
    def classes_(self) -> Optional[np.ndarray]:
        return None if self.clf is None else self.clf.classes_

    def save(self, path: PathLike) -> Path:
        """Save the fitted classifier and scaler as ``.npz`` (no pickle; the network is not
        saved: keep its HDF5 file, whose path is recorded when one was given).

        Arrays: ``coef``, ``intercept``, ``classes``, ``scaler_mean``, ``scaler_scale`` (empty
        without standardisation) and ``config`` (a JSON string).
        """
        if self.clf is None:
            raise ValueError("nothing to save: the classifier is not fitted")
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"save path should end in .npz, got {path}")
        classes = np.asarray(self.clf.classes_)
        if classes.dtype == object:
            classes = classes.astype(str)
        config = dict(self.config, format=_FORMAT)
        arrays = dict(coef=self.clf.coef_, intercept=self.clf.intercept_, classes=classes,
                      scaler_mean=(self.scaler_mean_ if self.scaler_mean_ is not None
                                   else np.zeros(0)),
                      scaler_scale=(self.scaler_scale_ if self.scaler_scale_ is not None
                                    else np.zeros(0)),
                      config=np.array(json.dumps(config)))
        return atomic_write(path, lambda fh: np.savez(fh, **arrays))

    @classmethod
    def load(cls, path: PathLike, dl_model: Any = None,
             custom_objects: Optional[Dict[str, object]] = None,
             safe_mode: bool = True) -> "MultiViewDLElasticNet":
        """Load a classifier written by :meth:`save`.

        Args:
            path: the ``.npz`` file (read with ``allow_pickle=False``).
            dl_model: the network (model or HDF5 path); default the path recorded at save time,
                if any, else features-only use.
            custom_objects: for loading the network.
            safe_mode: refuse a network file with Lambda layers (code).
        """
        path = Path(path)
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        try:
            config = json.loads(str(arrays["config"]))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path} is not a MultiViewDLElasticNet file ({exc})") from None
        if config.pop("format", None) != _FORMAT:
            raise ValueError(f"{path} is not a MultiViewDLElasticNet file (format mismatch)")
        model_path = config.pop("dl_model_path")
        dl_model = dl_model if dl_model is not None else model_path
        obj = cls(dl_model=dl_model, custom_objects=custom_objects, safe_mode=safe_mode, **config)
        clf = obj._new_classifier()
        clf.coef_ = arrays["coef"]
        clf.intercept_ = arrays["intercept"]
        clf.classes_ = arrays["classes"]
        clf.n_features_in_ = arrays["coef"].shape[1]
        clf.n_iter_ = np.array([0]) if config["classifier"] == "logistic" else 0
        obj.clf = clf
        if arrays["scaler_mean"].size:
            obj.scaler_mean_ = arrays["scaler_mean"]
            obj.scaler_scale_ = arrays["scaler_scale"]
        return obj
