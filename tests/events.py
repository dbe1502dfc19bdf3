"""Reading TensorBoard event files back, with TensorFlow alone (TensorBoard need not be installed)."""

from __future__ import annotations

from pathlib import Path


def tensorboard_scalars(run: Path) -> dict[str, dict[int, float]]:
    """A TensorBoard run's scalars, tag by tag and step by step, from its event files."""
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    series: dict[str, dict[int, float]] = {}
    for path in sorted(run.glob("events.out.tfevents.*")):
        for data in tf.data.TFRecordDataset(str(path)):
            event = event_pb2.Event.FromString(data.numpy())
            for value in event.summary.value:
                assert value.metadata.plugin_data.plugin_name == "scalars", value
                steps = series.setdefault(value.tag, {})
                assert event.step not in steps, f"{value.tag} twice at step {event.step}"
                steps[event.step] = tf.make_ndarray(value.tensor).item()
    return series
