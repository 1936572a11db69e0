"""The OCI side of pinhook: image references, registry credentials, and a client that resolves
tags to digests. Most of it ports a piece of the Go code the kubelet and container runtimes
use, so that pinhook reads, authorises and resolves an image the way they would:

- ``reference``: the image reference grammar and its normalisation, from
  github.com/distribution/reference, with github.com/opencontainers/go-digest's digest rules;
- ``registry``: the distribution API client that asks for a tag's manifest digest, after
  go-containerregistry's ``pkg/v1/remote``; under it ``auth`` (challenge ping, basic and bearer
  auth, token exchange and caches) and ``transport`` (retries, guarded redirects, deadlines),
  after its ``pkg/v1/remote/transport``; under that ``pool`` (keep-alive connections) of
  ``connection`` (HTTP/1.1 parsed by httptools) over ``streams`` (the running loop's sockets);
- ``hostguard``: pinhook's own guard against private addresses, on every host they go to;
- ``keychain``: docker config credentials read and matched to images as the kubelet's
  ``pkg/credentialprovider`` reads and matches them, over ``urlmatch`` (Go's ``url.Parse``,
  ``net.SplitHostPort`` and ``filepath.Match``, as the kubelet compares keys and images);
- ``credhelper``: pinhook's docker config file as docker reads it (``credHelpers``,
  ``credsStore``, tokens); ``credprovider``: the kubelet's credential provider plugins; both run
  their programs through ``command``;
- ``credential``: the credential and pull-context values they share.
"""
