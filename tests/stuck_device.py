"""A model that never returns from one config read (offset 0xfc): for the tests that a stuck
handler can still be stopped and is reported."""

import time

from .probe import ProbeDevice


class StuckDevice(ProbeDevice):
    def config_read(self, offset, data):
        if offset == 0xFC:
            while True:  # a handler stuck in a loop
                time.sleep(0.01)
        super().config_read(offset, data)
