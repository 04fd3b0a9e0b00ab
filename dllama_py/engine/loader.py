"""Weights from a model file or the network into the layout the kernels read.

The one place that chooses how a node holds its weights (`choose_layout`): as the file stores
them, or Q40 regrouped 16 rows at a time when this computer's SIMD path has a faster kernel
for that (`kernels.q40x16_fast`). The root (and one node alone) cuts its slices from the
memory-mapped file (`load_node_weights`); a worker receives them and calls `prepare_weights`.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

import numpy as np

from dllama_py.formats.model_file import ModelFile
from dllama_py.model import kernels
from dllama_py.model.config import FloatType, ModelConfig
from dllama_py.model.forward import tensor_layouts
from dllama_py.model.kernels import WeightLayout
from dllama_py.model.plan import Plan, cut_tensor
from dllama_py.model.structure import Split


def choose_layout(config: ModelConfig, mapped: bool = False) -> WeightLayout:
    """How this node holds the model's q40 matrices, or its matrices of weight_float_type when
    it has none. `mapped` weights stay views of the file, in the file's layout (regrouping would
    copy them)."""
    stored = WeightLayout(config.weight_float_type.label)
    if FloatType.Q40 in config.matrix_types and not mapped and kernels.q40x16_fast():
        return WeightLayout.Q40X16
    return stored


def prepare_tensor(array: np.ndarray, layout: WeightLayout) -> np.ndarray:
    """One tensor in `layout`: Q40 matrices regrouped (in place when the array owns writable
    memory of whole 16-row groups, else into a new array); anything else as it is."""
    if layout != WeightLayout.Q40X16 or array.dtype != np.uint8:
        return array
    if array.flags.writeable and array.flags.c_contiguous and array.shape[0] % 16 == 0:
        return kernels.repack_q40x16_inplace(array)  # own memory: received slices, column cuts
    return kernels.repack_q40x16(array)  # views of the model file, odd row counts


def prepare_weights(weights: MutableMapping[str, np.ndarray], layouts: Mapping[str, WeightLayout]) -> None:
    """Bring received weights into their layouts in place, one tensor at a time, so that a regrouped
    original is freed as soon as its copy exists (a worker's peak is its slice plus one tensor)."""
    for name in list(weights):  # names only: holding the arrays would keep every original alive
        weights[name] = prepare_tensor(weights[name], layouts[name])


def load_node_weights(model: ModelFile, plan: Plan, node: int, layout: WeightLayout, mapped: bool = False,
                      progress: bool = True) -> dict[str, np.ndarray]:
    """Node `node`'s slice of every tensor it holds, in `layout` (the embedding stays in the
    mapped file, with the root). By default every slice is copied (or regrouped) into anonymous
    memory, which numpy backs with huge pages: the kernels then stream weights about 14% faster
    than from the file's page cache (fewer TLB misses), and the file's pages are let go tensor by
    tensor. With `mapped`, row slices stay views of the mapped file (less RAM when the page cache
    cannot also hold the model; slower)."""
    from tqdm import tqdm

    layouts = tensor_layouts(model.config, layout)
    tensors = [t for t in model if plan.cut(t.name, node).kind is not Split.ROOT]
    total = plan.node_weight_bytes(node) - (plan.embedding_bytes() if node == 0 else 0)
    out = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", leave=False,
              disable=not progress or mapped or total < (256 << 20)) as bar:
        for tensor in tensors:
            data = tensor.data
            part = cut_tensor(data, tensor.float_type, plan.cut(tensor.name, node))
            if not mapped and not (layout == WeightLayout.Q40X16 and tensor.float_type == FloatType.Q40) \
                    and (not part.flags.writeable or (part.base is not None and part.nbytes < data.nbytes)):
                part = np.array(part)  # a copy of the file's bytes (regrouping copies by itself), or of a
                #                        part of a tensor built while loading (a view would keep all of it)
            out[tensor.name] = prepare_tensor(part, layouts[tensor.name])
            if not mapped:
                model.release(tensor.name)  # this tensor's pages of the file are no longer needed
            bar.update(part.nbytes)
    return out
