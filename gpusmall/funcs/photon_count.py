from .base import ReductionFunction


class PhotonCount(ReductionFunction):
    type = "photon_count"
