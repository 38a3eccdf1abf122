"""emit: a node added to an exported graph gets the fake value its op computes and the provenance of
the node it stands in for, and the graph still runs to the same numbers."""
import torch
from torch import nn

from rehyat_compile.passes.emit import emit

aten = torch.ops.aten


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)

    def forward(self, x):
        return self.proj(x) * 2.0


def test_emitted_node_has_its_fake_value_and_the_provenance_of_like():
    model = Scaled()
    gm = torch.export.export(model, (torch.randn(3, 4),)).module()
    like = next(n for n in gm.graph.nodes if n.target is aten.linear.default)
    output = next(iter(gm.graph.find_nodes(op="output")))
    with gm.graph.inserting_before(output):
        node = emit(gm.graph, aten.permute.default, (output.args[0][0], [1, 0]), like)
    output.args = ((node,),)
    gm.recompile()
    val = node.meta["val"]
    assert tuple(val.shape) == (6, 3) and val.dtype == torch.float32
    assert isinstance(val, torch._subclasses.FakeTensor)
    assert node.meta.get("nn_module_stack") == like.meta.get("nn_module_stack") and node.meta["nn_module_stack"]
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x).t())


def test_emitted_node_runs_to_the_value_its_op_gives():
    model = Scaled()
    gm = torch.export.export(model, (torch.randn(3, 4),)).module()
    mul = next(n for n in gm.graph.nodes if n.target is aten.mul.Tensor)
    with gm.graph.inserting_after(mul):
        node = emit(gm.graph, aten.add.Tensor, (mul, 1.0), mul, {"alpha": 3})
    mul.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    gm.recompile()
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x) + 3.0)
    assert tuple(node.meta["val"].shape) == (3, 6)
