"""Which Ray vidgen uses: a local one on loopback unless an address is given."""


def test_local_ray_stays_on_loopback(ray_session):
    import ray

    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}


def test_the_same_stop_signal_twice_at_once_is_one_notice_and_a_later_one_stops_at_once():
    """`ray job stop` sends SIGTERM to every process of the job, and the job script forwards its own
    to the vidgen command: that command saw two at once and stopped without its graceful stop."""
    import os
    import signal
    import time

    import pytest

    from vidgen import runtime

    with runtime.stop_on_signal("finishing") as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the same notice, from the job script
        except KeyboardInterrupt:
            pytest.fail("the same SIGTERM twice at once stopped at once")
        assert stop.by == "SIGTERM"
        time.sleep(runtime.REPEAT_S + 0.2)
        with pytest.raises(KeyboardInterrupt, match="SIGTERM again"):
            os.kill(os.getpid(), signal.SIGTERM)  # sent again later: stop at once
            time.sleep(1.0)
