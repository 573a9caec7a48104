"""Constants of the PostgreSQL frontend/backend protocol, version 3.0.

Source: PostgreSQL documentation, chapter "Frontend/Backend Protocol",
sections "Message Flow" and "Message Formats".
"""

# Protocol version 3.0 as sent in StartupMessage (major 3 << 16 | minor 0).
PROTOCOL_3_0 = 196608
# Special "versions" of the startup packet (protocol.sgml, "Message Formats").
CANCEL_REQUEST_CODE = 80877102  # 1234 << 16 | 5678
SSL_REQUEST_CODE = 80877103  # 1234 << 16 | 5679
GSSENC_REQUEST_CODE = 80877104  # 1234 << 16 | 5680

# PostgreSQL's own limit for the startup packet (MAX_STARTUP_PACKET_LENGTH in
# src/include/libpq/pqcomm.h): anything longer is a protocol violation.
MAX_STARTUP_PACKET = 10000
# PostgreSQL refuses regular messages larger than this (PQ_LARGE_MESSAGE_LIMIT,
# MaxAllocSize - 1); config may lower it with general.max_message_size.
MAX_MESSAGE_SIZE_LIMIT = 0x3FFFFFFF - 1
# Every regular message has a 1-byte type and a 4-byte length that counts itself.
HEADER_SIZE = 5

# --- Frontend message types (client -> server) --------------------------------
F_BIND = ord("B")
F_CLOSE = ord("C")
F_COPY_DATA = ord("d")
F_COPY_DONE = ord("c")
F_COPY_FAIL = ord("f")
F_DESCRIBE = ord("D")
F_EXECUTE = ord("E")
F_FLUSH = ord("H")
F_FUNCTION_CALL = ord("F")
F_PARSE = ord("P")
F_PASSWORD = ord("p")  # also SASLInitialResponse, SASLResponse, GSSResponse
F_QUERY = ord("Q")
F_SYNC = ord("S")
F_TERMINATE = ord("X")

FRONTEND_TYPES = frozenset(
    [F_BIND, F_CLOSE, F_COPY_DATA, F_COPY_DONE, F_COPY_FAIL, F_DESCRIBE, F_EXECUTE,
     F_FLUSH, F_FUNCTION_CALL, F_PARSE, F_PASSWORD, F_QUERY, F_SYNC, F_TERMINATE]
)

# --- Backend message types (server -> client) ---------------------------------
B_AUTHENTICATION = ord("R")
B_BACKEND_KEY_DATA = ord("K")
B_BIND_COMPLETE = ord("2")
B_CLOSE_COMPLETE = ord("3")
B_COMMAND_COMPLETE = ord("C")
B_COPY_DATA = ord("d")
B_COPY_DONE = ord("c")
B_COPY_IN_RESPONSE = ord("G")
B_COPY_OUT_RESPONSE = ord("H")
B_COPY_BOTH_RESPONSE = ord("W")
B_DATA_ROW = ord("D")
B_EMPTY_QUERY_RESPONSE = ord("I")
B_ERROR_RESPONSE = ord("E")
B_FUNCTION_CALL_RESPONSE = ord("V")
B_NEGOTIATE_PROTOCOL_VERSION = ord("v")
B_NO_DATA = ord("n")
B_NOTICE_RESPONSE = ord("N")
B_NOTIFICATION_RESPONSE = ord("A")
B_PARAMETER_DESCRIPTION = ord("t")
B_PARAMETER_STATUS = ord("S")
B_PARSE_COMPLETE = ord("1")
B_PORTAL_SUSPENDED = ord("s")
B_READY_FOR_QUERY = ord("Z")
B_ROW_DESCRIPTION = ord("T")

# Authentication request codes (the Int32 after 'R').
AUTH_OK = 0
AUTH_KERBEROS_V5 = 2
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_GSS = 7
AUTH_GSS_CONTINUE = 8
AUTH_SSPI = 9
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

# ReadyForQuery transaction status bytes.
TX_IDLE = ord("I")
TX_IN_TRANSACTION = ord("T")
TX_FAILED = ord("E")
