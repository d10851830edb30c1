from .base import ReductionFunction


class Droplet(ReductionFunction):
    type = "droplet"
