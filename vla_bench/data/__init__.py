"""Recorded robot data read without TensorFlow: TFRecord framing (`tfrecord`), tf.train.Example (`example_proto`),
the RLDS/TFDS layout (`rlds`), Bridge V2 ground truth (`bridge`) and LIBERO's HDF5 demos (`libero_hdf5`)."""
from .bridge import GROUND_TRUTHS, bridge_episodes
from .libero_hdf5 import libero_episodes, read_libero_demos, write_libero_demos
from .rlds import RLDSDataset, write_rlds

__all__ = ["GROUND_TRUTHS", "RLDSDataset", "bridge_episodes", "libero_episodes", "read_libero_demos",
           "write_libero_demos", "write_rlds"]
