// ABI marker: its presence tells Python that libllama carries our patches.
#include "infmllm.h"

int32_t infmllm_abi_version(void) {
    return INFMLLM_ABI_VERSION;
}

const char * infmllm_patchset_version(void) {
    return "infmllm-gguf/1";
}
