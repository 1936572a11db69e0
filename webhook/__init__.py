"""pinhook: rewrite image references and pin them to digests at admission."""
