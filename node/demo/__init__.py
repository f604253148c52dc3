"""``gvr demo``: the whole product on one machine, with nothing to install."""
