"""One task of an mtpack artifact as a model of its own, with the `onnx` package alone.

The task selector input becomes a constant and only the task's output stays, so ONNX Runtime
(or any runtime that folds constants) unpacks the task's masks once when it loads the model,
and the task runs at the plain backbone's speed. The same as `mtpack::serve` in Rust; the
README shows this function, and tests/cli/serve.rs runs it through the real ONNX Runtime.

    python scripts/specialize.py model.onnx mnist mnist.onnx
"""
import json
import sys

import numpy as np
import onnx
from onnx import numpy_helper


def specialize(model: onnx.ModelProto, task_name: str) -> onnx.ModelProto:
    manifest = json.loads({p.key: p.value for p in model.metadata_props}["mtpack.manifest"])
    task = next(t for t in manifest["tasks"] if t["name"] == task_name)
    g = model.graph
    selector = manifest.get("task_input")
    if selector:  # packnet, piggyback, ewc with per-task BatchNorm
        g.input.remove(next(i for i in g.input if i.name == selector))
        value = np.array([task["task_value"]], np.int64)
        g.initializer.append(numpy_helper.from_array(value, selector))
        # Drop the gate that turns the output to NaN under other task values (open here).
        out, ungated = task["output"], task["output"] + "/ungated"
        for gate in [n for n in g.node if out in n.output and ungated in n.input]:
            g.node.remove(gate)
        for n in g.node:
            for names in (n.input, n.output):
                renamed = [out if x == ungated else x for x in names]
                del names[:]
                names.extend(renamed)
    kept_outputs = [o for o in g.output if o.name == task["output"]]
    del g.output[:]
    g.output.extend(kept_outputs)
    # Drop what only other tasks needed (nodes are in topological order; no subgraphs).
    needed = {task["output"]}
    kept = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    del g.node[:]
    g.node.extend(reversed(kept))
    initializers = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(initializers)
    return model


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: specialize.py ARTIFACT.onnx TASK OUT.onnx")
    onnx.save(specialize(onnx.load(sys.argv[1]), sys.argv[2]), sys.argv[3])
