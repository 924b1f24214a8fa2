"""Serving: the websocket policy server (openpi-client compatible), our client and the action-chunk broker.

Client-side modules (``client``, ``broker``, ``wire``) need only numpy, msgpack and websockets; the server side
(``server``, ``policy``, ``cli``) drives ``motus_fast.infer``. Import the submodule you need.
"""
