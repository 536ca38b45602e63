"""Moving pools and volumes in and out: thin_dump XML, Docker's devicemapper store, raw images."""
