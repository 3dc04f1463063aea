"""Which Ray vidgen uses: a local one on loopback unless an address is given."""


def test_local_ray_stays_on_loopback(ray_session):
    import ray

    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
