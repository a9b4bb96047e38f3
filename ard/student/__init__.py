"""The ARD student: history attention, the student model, its sampler and its loss."""
from ard.student.attention import HistoryAttnProcessor, HistoryContext, KVCache, MaskKind, visible_steps
from ard.student.loss import StepMSELoss
from ard.student.model import ARDStudent, HeadKind, HistoryStart, OutputKind
from ard.student.sampling import sample

__all__ = ["ARDStudent", "HeadKind", "HistoryAttnProcessor", "HistoryContext", "HistoryStart", "KVCache",
           "MaskKind", "OutputKind", "StepMSELoss", "sample", "visible_steps"]
