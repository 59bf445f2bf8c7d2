// Same serialized form as the original VMM's class; test data only.
package eu.rapid.vmm;

public class VmInfo implements java.io.Serializable {
    private static final long serialVersionUID = -7722698437532950775L;
    String vmName;
    String vmIdByLM;
    long vmid;
    int vcpuNum;
    int memSize;
    int gpuCore;
    int diskSize;
    long userid;
    int status;
    int helperVmNum;
    String vmImagePath;
    String vmImageId;
    String ipAddress;
    boolean asSync;
    int osType;
    org.openstack4j.model.compute.Flavor flavor;
}
