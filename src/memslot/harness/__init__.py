"""The harness: code that drives the backends rather than being one — trace replay, the
differential fuzzer, VmallocUsed measurement and profile detection. Foundation modules
(constants, errors, request, profile) and the engine never import from here."""
