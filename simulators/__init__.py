"""Stand-ins for external systems, served over HTTP on loopback. The portal never imports them."""
