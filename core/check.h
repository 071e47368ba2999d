/* check.h - kept for older includes: the check and repair API is in qcow.h. */
#include "qcow.h"
