from .base import ReductionFunction


class Acf(ReductionFunction):
    type = "acf"
