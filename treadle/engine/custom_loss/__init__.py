"""Server-side custom losses: an uploaded torch.fx graph, decoded through an allow-list and run per datum."""

from treadle.engine.custom_loss.check import build
from treadle.engine.custom_loss.graph import Graph, decode_graph
from treadle.engine.custom_loss.loss import CustomLoss, run

__all__ = ["CustomLoss", "Graph", "build", "decode_graph", "run"]
